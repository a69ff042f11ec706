// Every mistake in one item is reported, not only the first.
use hodei::{StepError, step};

#[step(colour = "blue")]
fn build(target: String) -> Option<String> {
    Some(target)
}

fn main() {}
