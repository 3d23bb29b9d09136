//! Shared helpers of the benchmark suites.
