//! Agent benchmarks (issue 4): written by the benchmark work in progress.
fn main() {}
