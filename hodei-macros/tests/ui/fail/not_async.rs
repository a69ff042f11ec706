use hodei::{SagaContext, StepContext, StepError, saga, step};

#[step]
fn build(_ctx: StepContext) -> Result<(), StepError> {
    Ok(())
}

#[saga]
fn pipeline(_ctx: SagaContext, _: ()) -> Result<(), StepError> {
    Ok(())
}

fn main() {}
