use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::error::{Error, Result};
use crate::saga::{SagaDefinition, SagaShape};

/// The registered definitions, by name and version. Several versions of one name coexist, so
/// that a saga started on an older version resumes on it.
#[derive(Default)]
pub(super) struct Registry(RwLock<BTreeMap<String, BTreeMap<u32, SagaDefinition>>>);

impl Registry {
    pub(super) fn add(&self, definition: SagaDefinition) -> Result<()> {
        let mut registry = self.0.write().unwrap_or_else(|p| p.into_inner());
        let versions = registry.entry(definition.name.clone()).or_default();
        if versions.contains_key(&definition.version) {
            return Err(Error::DuplicateDefinition { name: definition.name, version: definition.version });
        }
        versions.insert(definition.version, definition);
        Ok(())
    }

    /// Every registered definition, by name then version.
    pub(super) fn all(&self) -> Vec<DefinitionInfo> {
        let registry = self.0.read().unwrap_or_else(|p| p.into_inner());
        registry
            .values()
            .flat_map(|versions| versions.values())
            .map(|d| DefinitionInfo { name: d.name.clone(), version: d.version, shape: d.shape() })
            .collect()
    }

    /// `version` of `name`, or its newest version if `None`.
    pub(super) fn get(&self, name: &str, version: Option<u32>) -> Option<SagaDefinition> {
        let registry = self.0.read().unwrap_or_else(|p| p.into_inner());
        let versions = registry.get(name)?;
        match version {
            Some(v) => versions.get(&v).cloned(),
            None => versions.values().next_back().cloned(),
        }
    }
}

/// A registered saga definition, as [`Engine::definitions`](crate::Engine::definitions) lists
/// it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DefinitionInfo {
    /// The definition name.
    pub name: String,
    /// The definition version.
    pub version: u32,
    /// The static shape, for definitions made by `#[saga]`.
    pub shape: Option<&'static SagaShape>,
}
