use hodei::{SagaContext, StepContext, StepError, saga, step};

#[step(retries = 3, retry(attempts = 2), timeout = "soon")]
async fn build(_ctx: StepContext) -> Result<(), StepError> {
    Ok(())
}

#[saga(versoin = 2)]
async fn pipeline(_ctx: SagaContext, _: ()) -> Result<(), StepError> {
    Ok(())
}

fn main() {}
