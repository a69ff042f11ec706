use std::marker::PhantomData;
use std::sync::atomic::Ordering;

use super::handle::{SagaHandle, TypedHandle};
use super::state::Engine;
use crate::bus::{EngineEvent, EngineEventKind};
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaRecord, Timestamp};
use crate::lock::lock;
use crate::saga::{Saga, SagaDefinition, SagaRun};

impl Engine {
    /// Starts a saga, or returns the existing run if one with this id and input exists.
    ///
    /// Returns once the start is on disk.
    pub async fn start(&self, run: SagaRun) -> Result<SagaHandle> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let definition = inner
            .registry
            .get(&run.definition, run.version)
            .ok_or_else(|| Error::UnknownSaga { name: run.definition.clone(), version: run.version })?;
        if run.input.len() > inner.config.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                what: format!("the input of saga `{}`", run.id),
                size: run.input.len(),
                limit: inner.config.max_payload_bytes,
            });
        }
        // Every start is checked, not only those given as JSON: a run whose input does not decode
        // would only fail at once, with a journal to clean up.
        (definition.input.check)(&run.input).map_err(|reason| Error::InvalidInput {
            definition: definition.name.clone(),
            version: definition.version,
            reason,
        })?;
        let now = inner.timers.now();
        let record = SagaRecord::new(run.id.clone(), definition.name.clone(), definition.version, now);
        let first = saga_started(&definition, &run.input, now);
        let created = {
            // Held across `create` so that a concurrent start of the same id finds either
            // nothing or a live saga, never a stored one that is not yet live.
            let mut live = lock(&inner.live);
            match inner.store.create(&record, &first)? {
                Some(existing) => Err(existing),
                None => {
                    let saga = inner.new_live(record, 1, false);
                    inner.observe_live(&saga, std::slice::from_ref(&first));
                    inner.observe_start(&definition.name);
                    live.insert(run.id.clone(), saga.clone());
                    Ok(saga)
                }
            }
        };
        match created {
            Err(existing) => self.check_same_run(&existing, &run, &definition)?,
            Ok(saga) => {
                if inner.bus.receiver_count() > 0 {
                    let kind = EngineEventKind::Journaled(first.clone());
                    let _ = inner.bus.send(EngineEvent { saga_id: run.id.clone(), kind });
                }
                inner.spawn(saga, definition, vec![first]);
                inner.store.durable().await?;
            }
        }
        Ok(SagaHandle { id: run.id, inner: inner.clone() })
    }

    fn check_same_run(
        &self,
        existing: &SagaRecord,
        run: &SagaRun,
        definition: &SagaDefinition,
    ) -> Result<()> {
        let conflict =
            |difference: String| Err(Error::IdempotencyConflict { id: run.id.clone(), difference });
        if existing.definition != run.definition {
            return conflict(format!("definition `{}`", existing.definition));
        }
        if let Some(version) = run.version.filter(|v| *v != existing.version) {
            return conflict(format!("version {} (asked for {version})", existing.version));
        }
        match self.inner.store.history(&run.id)?.first().map(|r| &r.event) {
            // As values of the input type: the journal may hold the input in an older codec,
            // or from before the type gained an optional field.
            Some(Event::SagaStarted { input, .. }) => match (definition.input.same)(input, &run.input) {
                Ok(true) => Ok(()),
                Ok(false) => conflict("another input".into()),
                Err(reason) => {
                    conflict(format!("an input that does not decode as the code's type ({reason})"))
                }
            },
            _ => conflict("another input".into()),
        }
    }

    /// Starts a statically typed saga (one made by `#[saga]`); see [`start`](Self::start).
    pub async fn start_saga<S: Saga>(
        &self,
        id: impl Into<String>,
        input: &S::Input,
    ) -> Result<TypedHandle<S::Output>> {
        let run = SagaRun::new(S::NAME, id, input)?.version(S::VERSION);
        Ok(TypedHandle { handle: self.start(run).await?, output: PhantomData })
    }
}

/// The first event of a run of `definition`.
pub(super) fn saga_started(definition: &SagaDefinition, input: &[u8], at: Timestamp) -> RecordedEvent {
    let event = Event::SagaStarted {
        definition: definition.name.clone(),
        version: definition.version,
        input: input.to_vec(),
    };
    RecordedEvent { seq: 0, at, event }
}
