//! An agent inside another program (the local provider's in-process workers) says what it does
//! through that program's `tracing` subscriber and writes nothing to its stderr; the
//! `hodei-agent` program still prints its status lines there.
//!
//! A process's own stderr cannot be captured from inside it, so the test runs itself as a
//! child (filtered to `quiet_agents_child`) and reads the child's stderr and stdout.

mod pipeline;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hodei_server::ControlPlane;
use hodei_server::jobs::{Job, MemorySecrets};
use pipeline::{completed, fast_hub, outcome, start};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};

const CHILD_ENV: &str = "HODEI_QUIET_AGENTS_CHILD";
const TRACED: &str = "hodei-test: traced";

/// Prints every `hodei_agent::agent` event's message to stdout, marked as seen by tracing.
#[derive(Debug)]
struct AgentEvents;

impl<S: Subscriber> Layer<S> for AgentEvents {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if !event.metadata().target().starts_with("hodei_agent::agent") {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        println!("{TRACED} {}", message.0);
    }
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

/// The child: a control plane with the default in-process workers runs one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_agents_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(AgentEvents)).unwrap();
    let dir = PathBuf::from(dir);
    let control = ControlPlane::builder(dir.join("data")).hub_config(fast_hub()).start().await.unwrap();
    let engine = pipeline::engine(control.dispatcher(Arc::new(MemorySecrets::new()))).await;
    let job = Job::pooled_script(["/bin/sh"], "echo built").env("PATH", "/usr/bin:/bin");
    let outcomes = completed(outcome(start(&engine, "quiet", vec![("build", job)]).await).await);
    assert_eq!(outcomes.len(), 1);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    control.shutdown().await.unwrap();
}

#[test]
fn in_process_agents_log_through_tracing_and_write_nothing_to_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "quiet_agents_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&child.stdout), String::from_utf8_lossy(&child.stderr));
    assert!(child.status.success(), "the child failed:\n{stdout}\n{stderr}");
    assert!(!stderr.contains("hodei-agent:"), "an in-process agent wrote to stderr:\n{stderr}");
    let traced: Vec<&str> =
        stdout.lines().filter_map(|line| line.split_once(TRACED)).map(|(_, m)| m).collect();
    assert!(traced.iter().any(|m| m.contains("registered; certificate stored")), "{traced:?}");
    assert!(traced.iter().any(|m| m.contains("session open as")), "{traced:?}");
}
