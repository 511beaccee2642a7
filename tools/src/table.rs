//! Plain-text tables for benchmark output.

use crate::out::{outln, StdoutError};

/// A table printed with aligned columns.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row and prints it at once, so long runs show progress.
    pub fn row(&mut self, cells: Vec<String>) -> Result<(), StdoutError> {
        if self.rows.is_empty() {
            outln!("{}", self.line(&self.header))?;
        }
        outln!("{}", self.line(&cells))?;
        self.rows.push(cells);
        Ok(())
    }

    fn line(&self, cells: &[String]) -> String {
        let widths = [20usize, 12, 14, 12, 12, 12, 12];
        let mut out = String::from("|");
        for (i, c) in cells.iter().enumerate() {
            let w = widths
                .get(i)
                .copied()
                .unwrap_or(12)
                .max(self.header[i].len());
            out.push_str(&format!(" {c:>w$} |"));
        }
        out
    }
}
