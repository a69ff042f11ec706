use std::sync::Arc;

use tokio::sync::broadcast;

use super::state::Engine;
use crate::driver::{LiveSaga, Scope, check};
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord, Timestamp};
use crate::replay_check::{PatchUse, ReplayReport, ReplayVerdict};
use crate::saga::SagaContext;
use crate::store::{EventStore, MemoryStore};

impl Engine {
    /// Replays the journal of the run `id` on the code this engine registers for its
    /// definition and version, and reports whether it would go on or park, and where: a check
    /// to run before a deploy, with the new code, against the journals of the runs in flight.
    ///
    /// Nothing runs live: no step, timer, wait or compensation, and nothing is written to the
    /// store. The check reads the journal as it is now; the run goes on meanwhile.
    ///
    /// ```
    /// use hodei_core::{Engine, EventStore, MemoryStore, ReplayVerdict, SagaDefinition, SagaRun, StepError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = std::sync::Arc::new(MemoryStore::new());
    /// let v1 = SagaDefinition::new("deploy", 1, |ctx, _: ()| async move {
    ///     ctx.step("build").run(|_, _: ()| async { Ok::<_, StepError>(()) }).await?;
    ///     ctx.wait_signal::<bool>("approve").await?;
    ///     Ok(())
    /// });
    /// let engine = Engine::builder().store(store.clone()).register(v1).start().await?;
    /// let run = engine.start(SagaRun::new("deploy", "deploy-1", &())?).await?;
    /// # while engine.history(run.id())?.len() < 4 { tokio::task::yield_now().await; }
    /// engine.shutdown(std::time::Duration::from_secs(1)).await?;
    ///
    /// // The new build renames the step: the run in flight would park.
    /// let renamed = SagaDefinition::new("deploy", 1, |ctx, _: ()| async move {
    ///     ctx.step("compile").run(|_, _: ()| async { Ok::<_, StepError>(()) }).await?;
    ///     ctx.wait_signal::<bool>("approve").await?;
    ///     Ok(())
    /// });
    /// let checker = Engine::builder().store(MemoryStore::new()).register(renamed).start().await?;
    /// let report = checker.check_journal(run.id(), &store.history(run.id())?).await?;
    /// assert_eq!(
    ///     report.verdict,
    ///     ReplayVerdict::WouldPark {
    ///         reason: "step 0: the code now calls `compile`, but the journal recorded `build` there".into()
    ///     }
    /// );
    /// # Ok(()) }
    /// ```
    pub async fn check_run(&self, id: &SagaId) -> Result<ReplayReport> {
        let history = self.history(id)?;
        if history.is_empty() {
            return Err(Error::SagaNotFound(id.clone()));
        }
        self.check_journal(id, &history).await
    }

    /// [`check_run`](Self::check_run) on every run in flight (running, compensating, paused,
    /// parked or waiting for its version), in the store's order.
    pub async fn check_in_flight(&self) -> Result<Vec<ReplayReport>> {
        let mut reports = Vec::new();
        for record in self.inner.store.records()? {
            if record.status.is_final() {
                continue;
            }
            match self.check_run(&record.id).await {
                Ok(report) => reports.push(report),
                // Listed before its first event is readable (a start in flight on a shared
                // store), or purged since: nothing to replay yet, or any more.
                Err(Error::SagaNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(reports)
    }

    /// [`check_run`](Self::check_run) on a journal given whole: one exported from another
    /// store, or committed as a fixture. `id` is the run's id, as its journal's idempotency
    /// keys use it.
    pub async fn check_journal(&self, id: &SagaId, history: &[RecordedEvent]) -> Result<ReplayReport> {
        let Some(Event::SagaStarted { definition: name, version, .. }) = history.first().map(|r| &r.event)
        else {
            return Err(Error::CorruptRecord {
                saga: id.to_string(),
                seq: history.first().map(|r| r.seq),
                reason: "a journal begins with SagaStarted".into(),
            });
        };
        let report = |verdict, patches: Vec<PatchUse>| ReplayReport {
            saga: id.clone(),
            definition: name.clone(),
            version: *version,
            verdict,
            patches,
        };
        let Some(definition) = self.inner.registry.get(name, Some(*version)) else {
            return Ok(report(ReplayVerdict::NoDefinition, Vec::new()));
        };
        let live = self.scratch(id, name, *version, history)?;
        let body =
            move |shared, input| (definition.body)(SagaContext { shared, scope: Scope::root() }, input);
        let (verdict, patches) = check(self.inner.host(), live, body, history.to_vec()).await;
        let patches = patches
            .into_iter()
            .map(|taken| PatchUse { patch: taken.patch, key: taken.key, new_path: taken.new_path })
            .collect();
        Ok(report(verdict, patches))
    }

    /// A live saga for a check: its journal is a copy of `history` in a store of its own, so
    /// that nothing the check might stage reaches the real one, and its events reach no
    /// subscriber of this engine.
    fn scratch(
        &self,
        id: &SagaId,
        name: &str,
        version: u32,
        history: &[RecordedEvent],
    ) -> Result<Arc<LiveSaga>> {
        let store = MemoryStore::new();
        let started = history.first().map_or(Timestamp(0), |r| r.at);
        let record = SagaRecord::new(id.clone(), name.to_owned(), version, started);
        if let Some((first, rest)) = history.split_first() {
            store.create(&record, first)?;
            store.append(id, rest, None)?;
        }
        let finished = history.iter().any(|r| r.event.is_final());
        let (next, bus) = (history.len() as u64, broadcast::Sender::new(1));
        Ok(self.inner.new_live_on(Arc::new(store), bus, record, next, finished))
    }
}
