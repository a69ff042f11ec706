//! The JSON Schema of a signal's payload type, read from the type's `Deserialize` impl.
//!
//! A saga that waits for a signal names the payload's type (`ctx.wait_signal::<Approval>`), and
//! operators who send it from the dashboard should get a form for that type, not a blank JSON
//! box. Asking users to derive a schema trait on every payload would put a bound on
//! `wait_signal` that plain serde types do not meet, so the shape is traced instead: the type
//! is deserialized from a recording deserializer (`tracer.rs`), once per pass until every
//! variant of every enum it reaches has been seen. Serde's attributes (`rename_all`, `rename`)
//! are honoured because the derived impl itself reports the names.
//!
//! What cannot be traced has no schema, and the dashboard falls back to JSON: types that ask
//! the format what comes next (`serde_json::Value`, untagged and internally tagged enums,
//! `flatten`), and types whose impl rejects the placeholder values tracing feeds them. Fields
//! with `#[serde(default)]` are listed as required: the impl does not tell tracing about them.

mod tracer;

use std::any::type_name;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, OnceLock};

use serde::de::DeserializeOwned;

use crate::lock::lock;

/// Larger schemas are not journaled: a form that big is no help, and every wait would carry it.
pub(crate) const MAX_SCHEMA_BYTES: usize = 16 * 1024;

/// The JSON Schema (draft 2020-12) of `T` as serde_json reads it, as compact JSON text, or
/// `None` when `T` cannot be traced or its schema is over [`MAX_SCHEMA_BYTES`]. Computed once
/// per type and process.
pub(crate) fn schema_of<T: DeserializeOwned>() -> Option<Arc<str>> {
    /// By type name: a wait asks each time it starts, and tracing runs once.
    type Known = HashMap<&'static str, Option<Arc<str>>>;
    static SCHEMAS: OnceLock<Mutex<Known>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(Default::default);
    if let Some(known) = lock(schemas).get(type_name::<T>()) {
        return known.clone();
    }
    // A user's impl that panics on a placeholder value must not take the saga down with it.
    let traced = catch_unwind(AssertUnwindSafe(tracer::trace::<T>));
    let schema = match traced {
        Ok(Ok(schema)) => {
            Some(schema.to_string()).filter(|text| text.len() <= MAX_SCHEMA_BYTES).map(Arc::from)
        }
        Ok(Err(why)) => {
            tracing::debug!(payload = type_name::<T>(), %why, "no schema for the payload type");
            None
        }
        Err(_) => None,
    };
    lock(schemas).insert(type_name::<T>(), schema.clone());
    schema
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde::Deserialize;
    use serde_json::{Value, json};

    use super::*;

    #[allow(dead_code)]
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Decision {
        Approve,
        Reject { reason: String },
        Defer(u32),
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Approval {
        approved: bool,
        by: Option<String>,
        decision: Decision,
        tags: Vec<String>,
        level: Level,
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Level {
        Low,
        High,
    }

    fn schema<T: DeserializeOwned>() -> Option<Value> {
        schema_of::<T>().map(|text| serde_json::from_str(&text).unwrap())
    }

    #[test]
    fn a_struct_with_nested_enums_has_every_field_and_variant() {
        let expected = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": "#/$defs/Approval",
            "$defs": {
                "Approval": {
                    "title": "Approval",
                    "type": "object",
                    "properties": {
                        "approved": { "type": "boolean" },
                        "by": { "anyOf": [{ "type": "string" }, { "type": "null" }] },
                        "decision": { "$ref": "#/$defs/Decision" },
                        "tags": { "type": "array", "items": { "type": "string" } },
                        "level": { "$ref": "#/$defs/Level" },
                    },
                    "required": ["approved", "decision", "tags", "level"],
                },
                "Decision": {
                    "title": "Decision",
                    "oneOf": [
                        { "title": "approve", "const": "approve" },
                        {
                            "title": "reject", "type": "object",
                            "properties": { "reject": {
                                "type": "object",
                                "properties": { "reason": { "type": "string" } },
                                "required": ["reason"],
                            } },
                            "required": ["reject"], "additionalProperties": false,
                        },
                        {
                            "title": "defer", "type": "object",
                            "properties": { "defer": { "type": "integer", "minimum": 0, "maximum": u32::MAX } },
                            "required": ["defer"], "additionalProperties": false,
                        },
                    ],
                },
                "Level": {
                    "title": "Level",
                    "oneOf": [{ "title": "Low", "const": "Low" }, { "title": "High", "const": "High" }],
                },
            },
        });
        assert_eq!(schema::<Approval>(), Some(expected));
    }

    #[test]
    fn primitives_and_collections_map_to_their_json_types() {
        let bare = |value: Value| {
            let mut value = value;
            value
                .as_object_mut()
                .unwrap()
                .insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
            Some(value)
        };
        assert_eq!(schema::<bool>(), bare(json!({ "type": "boolean" })));
        assert_eq!(schema::<i8>(), bare(json!({ "type": "integer", "minimum": -128, "maximum": 127 })));
        assert_eq!(
            schema::<HashMap<String, f64>>(),
            bare(json!({ "type": "object", "additionalProperties": { "type": "number" } }))
        );
        assert_eq!(
            schema::<(u8, String)>(),
            bare(json!({
                "type": "array", "items": false, "minItems": 2, "maxItems": 2,
                "prefixItems": [{ "type": "integer", "minimum": 0, "maximum": 255 }, { "type": "string" }],
            }))
        );
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Tree {
        children: Vec<Tree>,
        parent: Option<Box<Tree>>,
    }

    #[test]
    fn a_recursive_type_refers_to_itself() {
        let schema = schema::<Tree>().unwrap();
        assert_eq!(
            schema["$defs"]["Tree"]["properties"]["children"]["items"],
            json!({ "$ref": "#/$defs/Tree" })
        );
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    #[serde(tag = "kind")]
    enum InternallyTagged {
        A,
        B,
    }

    struct Panicky;

    impl<'de> Deserialize<'de> for Panicky {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let value = String::deserialize(deserializer)?;
            assert!(!value.is_empty(), "this impl panics on the placeholder tracing feeds it");
            Ok(Panicky)
        }
    }

    #[test]
    fn types_that_cannot_be_traced_have_no_schema() {
        assert_eq!(schema::<serde_json::Value>(), None);
        assert_eq!(schema::<InternallyTagged>(), None);
        assert_eq!(schema::<Panicky>(), None);
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Inner {
        X,
        Y(bool),
        Z { deep: Option<Level> },
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Outer {
        Plain,
        Holds(Inner),
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Reaches {
        maybe: Option<Outer>,
        many: Vec<Inner>,
    }

    fn variants(schema: &Value, name: &str) -> Vec<String> {
        let one_of = schema["$defs"][name]["oneOf"].as_array().unwrap_or_else(|| panic!("{name}: {schema}"));
        one_of.iter().map(|v| v["title"].as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn enums_behind_options_lists_and_other_variants_are_traced_in_full() {
        let schema = schema::<Reaches>().unwrap();
        assert_eq!(variants(&schema, "Outer"), ["Plain", "Holds"]);
        assert_eq!(variants(&schema, "Inner"), ["X", "Y", "Z"]);
        assert_eq!(variants(&schema, "Level"), ["Low", "High"]);
        assert_eq!(
            schema["$defs"]["Inner"]["oneOf"][2]["properties"]["Z"],
            json!({
                "type": "object",
                "properties": { "deep": { "anyOf": [{ "$ref": "#/$defs/Level" }, { "type": "null" }] } },
                "required": [],
            })
        );
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Expr {
        Literal(i64),
        Add(Box<Expr>, Box<Expr>),
    }

    #[test]
    fn a_recursive_enum_refers_to_itself() {
        let schema = schema::<Expr>().unwrap();
        assert_eq!(
            schema["$defs"]["Expr"]["oneOf"][1]["properties"]["Add"]["prefixItems"],
            json!([{ "$ref": "#/$defs/Expr" }, { "$ref": "#/$defs/Expr" }])
        );
    }

    mod elsewhere {
        #[allow(dead_code)]
        #[derive(serde::Deserialize)]
        pub struct Level {
            pub value: u8,
        }
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Namesakes {
        ours: Level,
        theirs: elsewhere::Level,
    }

    #[test]
    fn two_types_under_one_name_have_no_schema() {
        assert_eq!(schema::<Namesakes>(), None);
    }
}
