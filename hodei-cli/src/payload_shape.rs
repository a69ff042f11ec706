//! A one-line summary of the JSON Schema a signal wait journals for its payload, so that
//! `hodei runs show` tells what to send with `hodei runs signal` (the dashboard builds a form
//! from the same schema).

use serde_json::Value;

/// Named types deeper than this are shown by name only.
const MAX_DEPTH: usize = 3;

/// `{ comment: string, ticket?: integer, risk?: "low" | { high: { mitigation: string } } }`.
pub fn summary(schema: &Value) -> String {
    shape(schema, schema, 0)
}

fn resolve<'a>(schema: &'a Value, root: &'a Value) -> Option<(&'a str, &'a Value)> {
    let name = schema.get("$ref")?.as_str()?.strip_prefix("#/$defs/")?;
    root.get("$defs")?.get(name).map(|def| (name, def))
}

fn shape(schema: &Value, root: &Value, depth: usize) -> String {
    if let Some((name, def)) = resolve(schema, root) {
        return if depth >= MAX_DEPTH { name.to_owned() } else { shape(def, root, depth + 1) };
    }
    if let Some([inner]) = schema.get("allOf").and_then(Value::as_array).map(Vec::as_slice) {
        return shape(inner, root, depth);
    }
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        let shown: Vec<String> = options.iter().map(|option| shape(option, root, depth)).collect();
        return shown.join(" | ");
    }
    if let Some(variants) = schema.get("oneOf").and_then(Value::as_array) {
        let shown: Vec<String> = variants.iter().map(|variant| shape(variant, root, depth)).collect();
        return shown.join(" | ");
    }
    if let Some(constant) = schema.get("const") {
        return constant.to_string();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => object(schema, root, depth),
        Some("array") => match schema.get("prefixItems").and_then(Value::as_array) {
            Some(items) => {
                let shown: Vec<String> = items.iter().map(|item| shape(item, root, depth)).collect();
                format!("[{}]", shown.join(", "))
            }
            None => {
                format!("[{}]", schema.get("items").map_or("any".into(), |item| shape(item, root, depth)))
            }
        },
        Some(simple) => simple.to_owned(),
        None => "any".to_owned(),
    }
}

fn object(schema: &Value, root: &Value, depth: usize) -> String {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        let values = schema.get("additionalProperties").map_or("any".into(), |v| shape(v, root, depth));
        return format!("{{ string: {values} }}");
    };
    let required = |name: &str| {
        schema.get("required").and_then(Value::as_array).is_some_and(|r| r.iter().any(|n| n == name))
    };
    let fields: Vec<String> = properties
        .iter()
        .map(|(name, property)| {
            // An optional field's `| null` is said by its `?`.
            let property = match property.get("anyOf").and_then(Value::as_array).map(Vec::as_slice) {
                Some([inner, null]) if !required(name) && null["type"] == "null" => inner,
                _ => property,
            };
            let mark = if required(name) { "" } else { "?" };
            format!("{name}{mark}: {}", shape(property, root, depth))
        })
        .collect();
    if fields.is_empty() { "{}".to_owned() } else { format!("{{ {} }}", fields.join(", ")) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_struct_with_an_optional_enum_reads_as_one_line() {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": "#/$defs/Approval",
            "$defs": {
                "Approval": {
                    "title": "Approval", "type": "object",
                    "properties": {
                        "comment": { "type": "string" },
                        "risk": { "anyOf": [{ "$ref": "#/$defs/Risk" }, { "type": "null" }] },
                        "tags": { "type": "array", "items": { "type": "string" } },
                        "ticket": { "anyOf": [{ "type": "integer", "minimum": 0 }, { "type": "null" }] },
                    },
                    "required": ["comment", "tags"],
                },
                "Risk": {
                    "title": "Risk",
                    "oneOf": [
                        { "title": "low", "const": "low" },
                        { "title": "high", "type": "object", "required": ["high"], "additionalProperties": false,
                          "properties": { "high": { "type": "object", "required": ["mitigation"],
                                                    "properties": { "mitigation": { "type": "string" } } } } },
                    ],
                },
            },
        });
        assert_eq!(
            summary(&schema),
            r#"{ comment: string, risk?: "low" | { high: { mitigation: string } }, tags: [string], ticket?: integer }"#
        );
    }

    #[test]
    fn recursion_stops_at_a_name_and_plain_values_are_their_type() {
        let schema = json!({
            "$ref": "#/$defs/Tree",
            "$defs": { "Tree": { "type": "object", "required": ["children"],
                                 "properties": { "children": { "type": "array", "items": { "$ref": "#/$defs/Tree" } } } } },
        });
        assert_eq!(summary(&schema), "{ children: [{ children: [{ children: [Tree] }] }] }");
        assert_eq!(summary(&json!({ "type": "boolean" })), "boolean");
        assert_eq!(
            summary(&json!({ "type": "object", "additionalProperties": { "type": "number" } })),
            "{ string: number }"
        );
    }
}
