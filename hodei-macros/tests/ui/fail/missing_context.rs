use hodei::{StepError, saga, step};

#[step]
async fn build(target: String) -> Result<String, StepError> {
    Ok(target)
}

#[saga]
async fn pipeline() -> Result<(), StepError> {
    Ok(())
}

fn main() {}
