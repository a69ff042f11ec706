//! Every saga and every step runs in a `tracing` span that names it.

mod support;

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hodei_core::{MemoryStore, Outcome, SagaRun, StepError};
use support::{engine_with, saga};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Records each span's name and fields; nothing else.
#[derive(Clone, Default)]
struct SpanRecorder {
    spans: Arc<Mutex<Vec<String>>>,
    next_id: Arc<AtomicU64>,
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push_str(&format!(" {}={}", field.name(), value));
    }
}

impl Subscriber for SpanRecorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = Fields(span.metadata().name().to_string());
        span.record(&mut fields);
        self.spans.lock().unwrap().push(fields.0);
        Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[tokio::test]
async fn sagas_and_steps_have_spans_with_their_ids_and_names() {
    let recorder = SpanRecorder::default();
    // The default runtime of `#[tokio::test]` is single-threaded, so the thread-local
    // subscriber sees every task.
    let _guard = tracing::subscriber::set_default(recorder.clone());
    let def = saga("ci", 3, |ctx, _: ()| async move {
        ctx.step("compile").run(|_, ()| async { Ok::<_, StepError>(()) }).await?;
        ctx.step("test").run(|_, ()| async { Ok::<_, StepError>(()) }).await
    });
    let engine = engine_with(MemoryStore::new(), [def]).await;
    let run = engine.start(SagaRun::new("ci", "build-7", &()).unwrap()).await.unwrap();
    assert_eq!(run.outcome::<()>().await.unwrap(), Outcome::Completed(()));

    let spans = recorder.spans.lock().unwrap().clone();
    assert!(
        spans.contains(
            &"saga hodei.saga.id=build-7 hodei.saga.definition=ci hodei.saga.version=3".to_string()
        ),
        "{spans:?}"
    );
    for (index, name) in ["compile", "test"].iter().enumerate() {
        let step = format!(
            "step hodei.saga.id=build-7 hodei.step.name={name} hodei.step.index={index} hodei.step.key={index}"
        );
        assert!(spans.contains(&step), "{spans:?}");
    }
    assert_eq!(spans.iter().filter(|s| s.starts_with("attempt hodei.attempt=1")).count(), 2, "{spans:?}");
}
