//! Reproducible randomness for the crash suites, with no dependency: shared by the crash tests
//! here and in the facade (through `support`) and by the control plane's restart crash test
//! (by path).

/// The seed of a crash suite's kill schedule: `env`'s value when set (to replay a failure),
/// else a fresh one, so that every run explores new kill points. Printed either way.
pub fn seed(env: &str) -> u64 {
    let seed = match std::env::var(env) {
        Ok(value) => value.parse().unwrap_or_else(|_| panic!("{env}={value} is not a seed")),
        Err(_) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
        }
    };
    println!("seed {seed} (replay with {env}={seed})");
    seed
}

/// xorshift64: reproducible kill points from a printed seed, without a dependency.
#[derive(Debug)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn below(&mut self, bound: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % bound
    }
}
