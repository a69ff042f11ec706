//! A `tracing` layer that calls back when an event's message is a given one: how a test learns
//! that the code under test reached a point it logs (a step waiting for a held job), without
//! a hook of its own in that code.

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// Calls `then` for each event whose message is `message`.
pub struct OnMessage<F> {
    pub message: &'static str,
    pub then: F,
}

impl<S: tracing::Subscriber, F: Fn() + Send + Sync + 'static> tracing_subscriber::Layer<S> for OnMessage<F> {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Message(Option<String>);
        impl Visit for Message {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut message = Message(None);
        event.record(&mut message);
        if message.0.as_deref() == Some(self.message) {
            (self.then)();
        }
    }
}
