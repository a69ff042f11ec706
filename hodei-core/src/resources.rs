//! Values an application shares with every saga its engine runs: clients, connection pools, a
//! job dispatcher. Registered once on the [`EngineBuilder`](crate::EngineBuilder), reached by
//! type from a saga body, a step or a compensation.

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The resources of one engine, one value per type.
#[derive(Default)]
pub(crate) struct Resources(HashMap<TypeId, Resource>);

struct Resource {
    /// For errors and `Debug`: a `TypeId` does not say which type it is.
    type_name: &'static str,
    value: Arc<dyn Any + Send + Sync>,
}

impl Resources {
    /// Adds `value` as the resource of type `T`. A second value of one type is refused rather
    /// than replacing the first: whichever registration a saga would see, the other was a
    /// mistake.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: Arc<T>) -> Result<()> {
        match self.0.entry(TypeId::of::<T>()) {
            Entry::Occupied(_) => Err(Error::DuplicateResource { type_name: type_name::<T>() }),
            Entry::Vacant(entry) => {
                entry.insert(Resource { type_name: type_name::<T>(), value });
                Ok(())
            }
        }
    }

    /// The resource of type `T`.
    pub fn get<T: Send + Sync + 'static>(&self) -> Result<Arc<T>> {
        let value = self.0.get(&TypeId::of::<T>()).and_then(|r| r.value.clone().downcast::<T>().ok());
        value.ok_or(Error::MissingResource { type_name: type_name::<T>() })
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.values().map(|r| r.type_name)).finish()
    }
}
