//! A latency histogram with bounded relative error, so percentiles come from every sample
//! without keeping them: log-linear buckets, exact below [`EXACT_BELOW`] nanoseconds, and above
//! it [`SUB_BUCKETS`] buckets per power of two (a bucket's width is under 1/64 of its values).

/// Values below this are counted exactly, one bucket each.
const EXACT_BELOW: u64 = 128;
/// Buckets per power of two above [`EXACT_BELOW`].
const SUB_BUCKETS: u64 = 64;
/// Buckets in all: the exact ones, then 64 for each power of two from 2^7 to 2^63.
const BUCKETS: usize = (EXACT_BELOW + (64 - 7) * SUB_BUCKETS) as usize;

/// Counts of latencies in nanoseconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket_of(value: u64) -> usize {
    if value < EXACT_BELOW {
        return value as usize;
    }
    let exponent = 63 - u64::from(value.leading_zeros()); // 7..=63
    let shift = exponent - 6; // value >> shift is in 64..128
    let sub = (value >> shift) - SUB_BUCKETS;
    (EXACT_BELOW + (exponent - 7) * SUB_BUCKETS + sub) as usize
}

/// The smallest and largest value of a bucket.
fn bounds_of(bucket: usize) -> (u64, u64) {
    let bucket = bucket as u64;
    if bucket < EXACT_BELOW {
        return (bucket, bucket);
    }
    let exponent = (bucket - EXACT_BELOW) / SUB_BUCKETS + 7;
    let sub = (bucket - EXACT_BELOW) % SUB_BUCKETS + SUB_BUCKETS;
    let shift = exponent - 6;
    let low = sub << shift;
    (low, low + ((1u64 << shift) - 1))
}

impl Histogram {
    /// Counts one latency.
    pub fn record_ns(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    /// Counts one latency given as a duration.
    pub fn record(&mut self, elapsed: std::time::Duration) {
        self.record_ns(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// Samples counted.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at percentile `p` (0..=100): the middle of the bucket holding the sample of
    /// that rank, capped by the largest sample. `None` when empty.
    pub fn percentile_ns(&self, p: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((p / 100.0) * (self.total - 1) as f64).round() as u64;
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen > rank {
                let (low, high) = bounds_of(bucket);
                return Some((low + (high - low) / 2).min(self.max));
            }
        }
        Some(self.max)
    }

    /// [`Histogram::percentile_ns`] in milliseconds; NaN when empty.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        self.percentile_ns(p)
            .map_or(f64::NAN, |ns| ns as f64 / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order_without_gaps() {
        let mut expected_low = 0;
        for bucket in 0..BUCKETS {
            let (low, high) = bounds_of(bucket);
            assert_eq!(low, expected_low, "bucket {bucket}");
            assert!(high >= low);
            assert_eq!(bucket_of(low), bucket);
            assert_eq!(bucket_of(high), bucket);
            expected_low = high.wrapping_add(1);
        }
        assert_eq!(expected_low, 0, "the last bucket ends at u64::MAX");
    }

    #[test]
    fn percentiles_are_within_two_percent_of_the_sorted_samples() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut samples = Vec::new();
        let mut h = Histogram::default();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Spread over six decades, as latencies are.
            let v = (x % 1_000_000) * (1 + (x >> 60));
            samples.push(v);
            h.record_ns(v);
        }
        samples.sort_unstable();
        for p in [0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
            let exact = samples[((p / 100.0) * (samples.len() - 1) as f64).round() as usize];
            let got = h.percentile_ns(p).expect("not empty");
            let error = (got as f64 - exact as f64).abs();
            assert!(
                error <= exact as f64 / 50.0 + 1.0,
                "p{p}: {got} against {exact}"
            );
        }
    }

    #[test]
    fn merging_adds_the_counts() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        a.record_ns(10);
        b.record_ns(1_000_000);
        b.record_ns(2_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.percentile_ns(0.0), Some(10));
        assert!(a.percentile_ns(100.0).is_some_and(|v| v <= 2_000_000));
        assert!(Histogram::default().percentile_ms(50.0).is_nan());
    }
}
