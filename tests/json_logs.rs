//! The examples' JSON logs: every line inside a step names its saga and its step.

#[path = "../examples/support/logging.rs"]
mod logging;

use std::io::Write;
use std::sync::{Arc, Mutex};

use hodei::{Engine, MemoryStore, Outcome, SagaContext, SagaDefinition, SagaRun, StepError};
use tracing_subscriber::layer::SubscriberExt as _;

/// What the layer writes, kept for the test to read.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Lines;
    fn make_writer(&'a self) -> Lines {
        self.clone()
    }
}

#[tokio::test]
async fn a_line_inside_a_step_names_the_saga_and_the_step() {
    let lines = Lines::default();
    // The default runtime of `#[tokio::test]` has one thread: the thread's subscriber sees
    // every task.
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(logging::json_layer(lines.clone())),
    );
    let definition = SagaDefinition::new("ci", 2, |ctx: SagaContext, (): ()| async move {
        ctx.step("compile")
            .run(|_, ()| async {
                tracing::info!(units = 3, "compiling");
                Ok::<_, StepError>(())
            })
            .await
    });
    let engine = Engine::builder().store(MemoryStore::new()).register(definition).start().await.unwrap();
    let run = engine.start(SagaRun::new("ci", "json-1", &()).unwrap()).await.unwrap();
    assert_eq!(run.outcome::<()>().await.unwrap(), Outcome::Completed(()));

    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let line = text.lines().find(|line| line.contains("compiling")).unwrap_or_else(|| panic!("{text}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["message"], "compiling");
    assert_eq!(line["units"], 3);
    let spans = line["spans"].as_array().unwrap_or_else(|| panic!("{line}"));
    let field = |name: &str, field: &str| spans.iter().find(|s| s["name"] == name).map(|s| s[field].clone());
    assert_eq!(field("saga", "hodei.saga.id"), Some("json-1".into()), "{line}");
    assert_eq!(field("saga", "hodei.saga.definition"), Some("ci".into()), "{line}");
    assert_eq!(field("step", "hodei.step.name"), Some("compile".into()), "{line}");
    assert_eq!(field("attempt", "hodei.attempt"), Some(1.into()), "{line}");
}
