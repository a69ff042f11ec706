//! A deserializer that records, instead of reading, what a type's `Deserialize` impl asks for,
//! as JSON Schema.
//!
//! It feeds placeholder values (false, 0, "", one element per list, `Some` for options) and
//! writes the schema of each position as the impl asks for it. A deserialization returns one
//! value, so it reaches one variant of each enum: the type is deserialized again, pass after
//! pass, each encounter with an enum taking a variant not traced yet, until every variant of
//! every enum reached has been seen. Named types (structs, enums, newtypes) go into `$defs`
//! under serde's name for them; one met again inside itself is a `$ref`, and below it the
//! values are the smallest the impl accepts (`None`, empty lists), so recursive types end.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Visitor};
use serde_json::{Map, Value, json};

/// Passes before an enum still not fully traced is given up on (it becomes free-form JSON).
const MAX_PASSES: usize = 64;
/// Nesting at which tracing stops: a type that deep is no form's business.
const MAX_DEPTH: usize = 64;

/// Why a type could not be traced.
#[derive(Debug)]
pub(super) struct TraceError(String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

impl de::Error for TraceError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

fn unsupported(what: &str) -> TraceError {
    TraceError(format!("{what} cannot be traced: the type decides by what the input holds"))
}

struct EnumTrace {
    variants: &'static [&'static str],
    /// The schema of each variant's JSON form, once a pass reached it.
    traced: Vec<Option<Value>>,
}

#[derive(Default)]
struct Tracer {
    defs: BTreeMap<&'static str, Value>,
    enums: BTreeMap<&'static str, EnumTrace>,
    /// Named types being traced, outermost first.
    stack: Vec<&'static str>,
    pass: usize,
    depth: usize,
}

impl Tracer {
    fn complete(&self) -> bool {
        self.enums.values().all(|e| e.traced.iter().all(Option::is_some))
    }

    /// Records a named type's schema; two different types under one serde name (generic
    /// instances, or namesakes from two modules) make the type untraceable.
    fn define(&mut self, name: &'static str, schema: Value) -> Result<(), TraceError> {
        if self.enums.contains_key(name) {
            return Err(namesakes(name));
        }
        match self.defs.get(name) {
            Some(known) if *known != schema => Err(namesakes(name)),
            Some(_) => Ok(()),
            None => {
                self.defs.insert(name, schema);
                Ok(())
            }
        }
    }

    fn into_schema(self, root: Value) -> Value {
        let mut defs: Map<String, Value> = Map::new();
        for (name, mut schema) in self.defs {
            titled(&mut schema, name);
            defs.insert(name.to_owned(), schema);
        }
        for (name, trace) in self.enums {
            let mut schema = match trace.traced.into_iter().collect::<Option<Vec<Value>>>() {
                Some(one_of) => json!({ "oneOf": one_of }),
                None => json!({ "description": "not every variant could be traced: any JSON" }),
            };
            titled(&mut schema, name);
            defs.insert(name.to_owned(), schema);
        }
        let mut schema = match root {
            Value::Object(map) => map,
            other => Map::from_iter([("allOf".to_owned(), json!([other]))]),
        };
        schema.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
        if !defs.is_empty() {
            schema.insert("$defs".into(), Value::Object(defs));
        }
        Value::Object(schema)
    }
}

fn namesakes(name: &str) -> TraceError {
    TraceError(format!("two types are named `{name}`"))
}

fn titled(schema: &mut Value, name: &str) {
    if let Value::Object(map) = schema {
        map.insert("title".into(), json!(name));
    }
}

fn reference(name: &str) -> Value {
    // A JSON Pointer token (RFC 6901).
    json!({ "$ref": format!("#/$defs/{}", name.replace('~', "~0").replace('/', "~1")) })
}

/// The JSON Schema of `T` as serde_json reads it.
pub(super) fn trace<T: DeserializeOwned>() -> Result<Value, TraceError> {
    let mut tracer = Tracer::default();
    let mut root = Value::Null;
    for pass in 0..MAX_PASSES {
        tracer.pass = pass;
        root = Value::Null;
        T::deserialize(Probe { tracer: &mut tracer, out: &mut root, shallow: false })?;
        if tracer.complete() {
            break;
        }
    }
    Ok(tracer.into_schema(root))
}

/// One position of the value being deserialized: its schema goes to `out`. A shallow probe
/// (below a type met again inside itself) records nothing and gives the smallest values.
struct Probe<'t> {
    tracer: &'t mut Tracer,
    out: &'t mut Value,
    shallow: bool,
}

impl<'t> Probe<'t> {
    fn record(&mut self, schema: Value) {
        if !self.shallow {
            *self.out = schema;
        }
    }

    fn nested<R>(&mut self, go: impl FnOnce(&mut Tracer) -> Result<R, TraceError>) -> Result<R, TraceError> {
        if self.tracer.depth >= MAX_DEPTH {
            return Err(TraceError(format!("the type nests deeper than {MAX_DEPTH} levels")));
        }
        self.tracer.depth += 1;
        let result = go(self.tracer);
        self.tracer.depth -= 1;
        result
    }

    /// Enters a named type, recording its `$ref`; true when its content is to be probed
    /// shallow (this probe is, or the type is already being traced further out).
    fn enter(&mut self, name: &'static str) -> bool {
        self.record(reference(name));
        let recursive = self.tracer.stack.contains(&name);
        self.shallow || recursive
    }
}

macro_rules! integers {
    ($($method:ident $visit:ident $ty:ty => $min:expr, $max:expr;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
            let value = visitor.$visit(<$ty>::default())?;
            let (min, max): (Value, Value) = ($min, $max);
            let mut probe = self;
            let mut schema = json!({ "type": "integer" });
            if !min.is_null() {
                schema["minimum"] = min;
            }
            if !max.is_null() {
                schema["maximum"] = max;
            }
            probe.record(schema);
            Ok(value)
        }
    )*};
}

impl<'de, 't> de::Deserializer<'de> for Probe<'t> {
    type Error = TraceError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        Err(unsupported(
            "a self-describing value (serde_json::Value, untagged or internally tagged enums, flatten)",
        ))
    }

    fn deserialize_bool<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        self.record(json!({ "type": "boolean" }));
        visitor.visit_bool(false)
    }

    integers! {
        deserialize_i8 visit_i8 i8 => json!(i8::MIN), json!(i8::MAX);
        deserialize_i16 visit_i16 i16 => json!(i16::MIN), json!(i16::MAX);
        deserialize_i32 visit_i32 i32 => json!(i32::MIN), json!(i32::MAX);
        deserialize_i64 visit_i64 i64 => json!(i64::MIN), json!(i64::MAX);
        // Bounds beyond 64 bits have no exact JSON number here.
        deserialize_i128 visit_i128 i128 => Value::Null, Value::Null;
        deserialize_u8 visit_u8 u8 => json!(0), json!(u8::MAX);
        deserialize_u16 visit_u16 u16 => json!(0), json!(u16::MAX);
        deserialize_u32 visit_u32 u32 => json!(0), json!(u32::MAX);
        deserialize_u64 visit_u64 u64 => json!(0), json!(u64::MAX);
        deserialize_u128 visit_u128 u128 => json!(0), Value::Null;
    }

    fn deserialize_f32<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        self.record(json!({ "type": "number" }));
        visitor.visit_f32(0.0)
    }

    fn deserialize_f64<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        self.record(json!({ "type": "number" }));
        visitor.visit_f64(0.0)
    }

    fn deserialize_char<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        self.record(json!({ "type": "string", "minLength": 1, "maxLength": 1 }));
        visitor.visit_char('a')
    }

    fn deserialize_str<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        self.record(json!({ "type": "string" }));
        visitor.visit_str("")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        self.record(json!({ "type": "array", "items": { "type": "integer", "minimum": 0, "maximum": 255 } }));
        visitor.visit_bytes(&[])
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        if self.shallow {
            return visitor.visit_none();
        }
        let mut inner = Value::Null;
        let value =
            self.nested(|tracer| visitor.visit_some(Probe { tracer, out: &mut inner, shallow: false }))?;
        self.record(json!({ "anyOf": [inner, { "type": "null" }] }));
        Ok(value)
    }

    fn deserialize_unit<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        self.record(json!({ "type": "null" }));
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        mut self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        if !self.enter(name) {
            self.tracer.define(name, json!({ "type": "null" }))?;
        }
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        mut self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let shallow = self.enter(name);
        let mut inner = Value::Null;
        let value = self.nested(|tracer| {
            tracer.stack.push(name);
            let value =
                visitor.visit_newtype_struct(Probe { tracer: &mut *tracer, out: &mut inner, shallow });
            tracer.stack.pop();
            value
        })?;
        if !shallow {
            self.tracer.define(name, json!({ "allOf": [inner] }))?;
        }
        Ok(value)
    }

    fn deserialize_seq<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        let shallow = self.shallow;
        let mut items = vec![Value::Null];
        let value = self.nested(|tracer| {
            visitor.visit_seq(Elements {
                tracer,
                schemas: &mut items,
                next: 0,
                len: usize::from(!shallow),
                shallow,
            })
        })?;
        self.record(json!({ "type": "array", "items": items.swap_remove(0) }));
        Ok(value)
    }

    fn deserialize_tuple<V: Visitor<'de>>(mut self, len: usize, visitor: V) -> Result<V::Value, TraceError> {
        let shallow = self.shallow;
        let mut items = vec![Value::Null; len];
        let value = self.nested(|tracer| {
            visitor.visit_seq(Elements { tracer, schemas: &mut items, next: 0, len, shallow })
        })?;
        self.record(tuple_schema(items));
        Ok(value)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        mut self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let shallow = self.enter(name);
        let mut items = vec![Value::Null; len];
        let value = self.nested(|tracer| {
            tracer.stack.push(name);
            let value = visitor.visit_seq(Elements {
                tracer: &mut *tracer,
                schemas: &mut items,
                next: 0,
                len,
                shallow,
            });
            tracer.stack.pop();
            value
        })?;
        if !shallow {
            self.tracer.define(name, tuple_schema(items))?;
        }
        Ok(value)
    }

    fn deserialize_map<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        let shallow = self.shallow;
        let mut entry = [Value::Null, Value::Null];
        let value = self.nested(|tracer| {
            visitor.visit_map(Entries {
                tracer,
                schemas: &mut entry,
                keys: None,
                next: 0,
                len: usize::from(!shallow),
                shallow,
            })
        })?;
        // serde_json writes every map key as a string.
        let [_, values] = entry;
        self.record(json!({ "type": "object", "additionalProperties": values }));
        Ok(value)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        mut self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let shallow = self.enter(name);
        let mut schemas = vec![Value::Null; fields.len()];
        let value = self.nested(|tracer| {
            tracer.stack.push(name);
            let entries = Entries {
                tracer: &mut *tracer,
                schemas: &mut schemas,
                keys: Some(fields),
                next: 0,
                len: fields.len(),
                shallow,
            };
            let value = visitor.visit_map(entries);
            tracer.stack.pop();
            value
        })?;
        if !shallow {
            self.tracer.define(name, struct_schema(fields, schemas))?;
        }
        Ok(value)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        mut self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        if variants.is_empty() {
            return Err(TraceError(format!("the enum `{name}` has no variants")));
        }
        let shallow = self.enter(name);
        let pass = self.tracer.pass;
        if self.tracer.defs.contains_key(name) {
            return Err(namesakes(name));
        }
        let trace = self
            .tracer
            .enums
            .entry(name)
            .or_insert_with(|| EnumTrace { variants, traced: vec![None; variants.len()] });
        if trace.variants != variants {
            return Err(namesakes(name));
        }
        let index = if shallow {
            // The smallest value: a unit variant if one is known.
            trace
                .traced
                .iter()
                .position(|t| t.as_ref().is_some_and(|s| s.get("const").is_some()))
                .unwrap_or(0)
        } else {
            // A variant not traced yet, or, once all are, each in turn, so that enums nested
            // in other variants are reached too.
            trace.traced.iter().position(Option::is_none).unwrap_or(pass % variants.len())
        };
        self.nested(|tracer| {
            tracer.stack.push(name);
            let value = visitor.visit_enum(Variant { tracer: &mut *tracer, name, index, shallow });
            tracer.stack.pop();
            value
        })
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        Err(unsupported("an identifier outside a struct or enum"))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        visitor.visit_unit()
    }

    fn is_human_readable(&self) -> bool {
        // serde_json is: types like `SystemTime` or `IpAddr` take another shape there.
        true
    }
}

fn tuple_schema(items: Vec<Value>) -> Value {
    let len = items.len();
    json!({ "type": "array", "prefixItems": items, "items": false, "minItems": len, "maxItems": len })
}

fn struct_schema(fields: &[&str], schemas: Vec<Value>) -> Value {
    // serde_json reads a missing `Option` field as `None`.
    let optional = |schema: &Value| schema["anyOf"][1] == json!({ "type": "null" });
    let required: Vec<&str> =
        fields.iter().zip(&schemas).filter(|(_, schema)| !optional(schema)).map(|(name, _)| *name).collect();
    let properties: Map<String, Value> = fields.iter().map(|name| (*name).to_owned()).zip(schemas).collect();
    json!({ "type": "object", "properties": properties, "required": required })
}

/// The elements of a list or tuple: `len` of them, each probed into `schemas[i]` (a list
/// probes one element, into `schemas[0]`).
struct Elements<'a> {
    tracer: &'a mut Tracer,
    schemas: &'a mut [Value],
    next: usize,
    len: usize,
    shallow: bool,
}

impl<'de> de::SeqAccess<'de> for Elements<'_> {
    type Error = TraceError;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, TraceError> {
        if self.next == self.len {
            return Ok(None);
        }
        let out = &mut self.schemas[self.next.min(self.schemas.len() - 1)];
        self.next += 1;
        seed.deserialize(Probe { tracer: &mut *self.tracer, out, shallow: self.shallow }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.len - self.next)
    }
}

/// A struct's fields by name (`keys`), or one entry of a map whose key and value are probed
/// into `schemas[0]` and `schemas[1]`.
struct Entries<'a> {
    tracer: &'a mut Tracer,
    schemas: &'a mut [Value],
    keys: Option<&'static [&'static str]>,
    next: usize,
    len: usize,
    shallow: bool,
}

impl<'de> de::MapAccess<'de> for Entries<'_> {
    type Error = TraceError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, TraceError> {
        if self.next == self.len {
            return Ok(None);
        }
        match self.keys {
            Some(keys) => seed.deserialize(BorrowedStrDeserializer::new(keys[self.next])).map(Some),
            None => seed
                .deserialize(Probe {
                    tracer: &mut *self.tracer,
                    out: &mut self.schemas[0],
                    shallow: self.shallow,
                })
                .map(Some),
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, TraceError> {
        let slot = if self.keys.is_some() { self.next } else { 1 };
        self.next += 1;
        seed.deserialize(Probe {
            tracer: &mut *self.tracer,
            out: &mut self.schemas[slot],
            shallow: self.shallow,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.len - self.next)
    }
}

/// The variant an encounter with an enum takes.
struct Variant<'a> {
    tracer: &'a mut Tracer,
    name: &'static str,
    index: usize,
    shallow: bool,
}

impl Variant<'_> {
    fn variant_name(&self) -> &'static str {
        self.tracer.enums[self.name].variants[self.index]
    }

    /// Records the variant's JSON form: its name for a unit variant, else an object with its
    /// name as the one key.
    fn record(&mut self, content: Option<Value>) {
        if self.shallow {
            return;
        }
        let variant = self.variant_name();
        let schema = match content {
            None => json!({ "title": variant, "const": variant }),
            Some(content) => json!({
                "title": variant,
                "type": "object",
                "properties": { variant: content },
                "required": [variant],
                "additionalProperties": false,
            }),
        };
        if let Some(trace) = self.tracer.enums.get_mut(self.name) {
            trace.traced[self.index] = Some(schema);
        }
    }
}

impl<'de, 'a> de::EnumAccess<'de> for Variant<'a> {
    type Error = TraceError;
    type Variant = Variant<'a>;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self::Variant), TraceError> {
        let value = seed.deserialize(BorrowedStrDeserializer::<TraceError>::new(self.variant_name()))?;
        Ok((value, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_> {
    type Error = TraceError;

    fn unit_variant(mut self) -> Result<(), TraceError> {
        self.record(None);
        Ok(())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(mut self, seed: S) -> Result<S::Value, TraceError> {
        let mut content = Value::Null;
        let value =
            seed.deserialize(Probe { tracer: &mut *self.tracer, out: &mut content, shallow: self.shallow })?;
        self.record(Some(content));
        Ok(value)
    }

    fn tuple_variant<V: Visitor<'de>>(mut self, len: usize, visitor: V) -> Result<V::Value, TraceError> {
        let mut items = vec![Value::Null; len];
        let elements =
            Elements { tracer: &mut *self.tracer, schemas: &mut items, next: 0, len, shallow: self.shallow };
        let value = visitor.visit_seq(elements)?;
        self.record(Some(tuple_schema(items)));
        Ok(value)
    }

    fn struct_variant<V: Visitor<'de>>(
        mut self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let mut schemas = vec![Value::Null; fields.len()];
        let entries = Entries {
            tracer: &mut *self.tracer,
            schemas: &mut schemas,
            keys: Some(fields),
            next: 0,
            len: fields.len(),
            shallow: self.shallow,
        };
        let value = visitor.visit_map(entries)?;
        self.record(Some(struct_schema(fields, schemas)));
        Ok(value)
    }
}
