//! The deterministic simulator of DerechoFS clusters.
