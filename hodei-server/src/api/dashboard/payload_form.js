// A form for a signal's payload, built from the JSON Schema the saga's wait journaled (the
// API's `payload_schema`, traced from the Rust type the saga reads). It covers what that
// tracing produces: booleans, numbers, strings, optional values, structs and enums in serde's
// default representation. Lists, maps, tuples and anything nested deeper than a person would
// fill in field by field get a JSON box of their own.

import { el } from "./dom.js";

/** Deeper than this, a value is typed as JSON: a form that deep helps nobody. */
const MAX_DEPTH = 6;

/**
 * Returns `{ node, read }`: the form's element, and a function that reads the value it holds
 * or throws an Error naming the field that is wrong.
 */
export function payloadForm(schema) {
  return field(schema, schema, "payload", "payload", 0);
}

/** Follows `$ref`s into `$defs` and newtype wrappers (`allOf` of one), keeping the title. */
function resolve(schema, root) {
  let title = schema.title;
  for (let hops = 0; hops < 32; hops++) {
    if (typeof schema.$ref === "string" && schema.$ref.startsWith("#/$defs/")) {
      const name = schema.$ref.slice("#/$defs/".length).replaceAll("~1", "/").replaceAll("~0", "~");
      schema = (root.$defs || {})[name];
      if (!schema) return { title };
    } else if (Array.isArray(schema.allOf) && schema.allOf.length === 1 && !schema.type) {
      schema = schema.allOf[0];
    } else {
      break;
    }
    title = title || schema.title;
  }
  return { ...schema, title: schema.title || title };
}

const isNull = (schema) => schema && schema.type === "null";

function field(raw, root, label, path, depth) {
  const schema = resolve(raw, root);
  if (depth > MAX_DEPTH) return jsonBox(label, path);
  if (isNull(schema)) return { node: null, read: () => null };
  if (Array.isArray(schema.anyOf) && schema.anyOf.length === 2 && schema.anyOf.some(isNull)) {
    return optional(schema.anyOf.find((s) => !isNull(s)), root, label, path, depth);
  }
  if (Array.isArray(schema.oneOf)) return choice(schema, root, label, path, depth);
  switch (schema.type) {
    case "boolean":
      return checkbox(label, path);
    case "integer":
    case "number":
      return number(schema, label, path);
    case "string":
      return text(schema, label, path);
    case "object":
      if (schema.properties) return object(schema, root, label, path, depth);
      return jsonBox(label, path);
    default:
      return jsonBox(label, path);
  }
}

function labelled(label, path, input) {
  return el("label", { class: "payload-field" }, el("span", {}, label), input);
}

function checkbox(label, path) {
  const input = el("input", { type: "checkbox", name: path, "aria-label": path });
  return { node: labelled(label, path, input), read: () => input.checked };
}

function number(schema, label, path) {
  const integer = schema.type === "integer";
  const input = el("input", {
    type: "number",
    name: path,
    "aria-label": path,
    step: integer ? "1" : "any",
    min: schema.minimum,
    max: schema.maximum,
    required: true,
  });
  const read = () => {
    if (input.value.trim() === "") throw new Error(`${path} needs a number`);
    const value = Number(input.value);
    if (!Number.isFinite(value)) throw new Error(`${path} is not a number`);
    if (integer && !Number.isInteger(value)) throw new Error(`${path} must be a whole number`);
    if (schema.minimum !== undefined && value < schema.minimum) throw new Error(`${path} must be at least ${schema.minimum}`);
    if (schema.maximum !== undefined && value > schema.maximum) throw new Error(`${path} must be at most ${schema.maximum}`);
    return value;
  };
  return { node: labelled(label, path, input), read };
}

function text(schema, label, path) {
  const input = el("input", { type: "text", name: path, "aria-label": path, maxlength: schema.maxLength });
  const read = () => {
    if (schema.minLength !== undefined && input.value.length < schema.minLength) {
      throw new Error(`${path} needs at least ${schema.minLength} character(s)`);
    }
    return input.value;
  };
  return { node: labelled(label, path, input), read };
}

/** A value that may be left out: a checkbox says whether it is given. */
function optional(inner, root, label, path, depth) {
  const given = el("input", { type: "checkbox", name: `${path}?`, "aria-label": `give ${path}` });
  const content = field(inner, root, label, path, depth);
  const slot = el("div", { class: "payload-optional", hidden: true }, content.node);
  given.addEventListener("change", () => {
    slot.hidden = !given.checked;
  });
  const node = el("div", {}, el("label", { class: "payload-field" }, given, el("span", {}, `give ${label}`)), slot);
  return { node, read: () => (given.checked ? content.read() : null) };
}

function object(schema, root, label, path, depth) {
  const fields = Object.entries(schema.properties).map(([name, property]) => [
    name,
    field(property, root, name, path === "payload" ? name : `${path}.${name}`, depth + 1),
  ]);
  const node = el(
    "fieldset",
    { class: "payload-object" },
    el("legend", {}, schema.title || label),
    fields.map(([, f]) => f.node),
  );
  const read = () => Object.fromEntries(fields.map(([name, f]) => [name, f.read()]));
  return { node, read };
}

/** An enum: a unit variant is its name; any other is `{ variant: content }`. */
function choice(schema, root, label, path, depth) {
  const variants = schema.oneOf.map((variant) => {
    if (variant.const !== undefined) return { title: variant.title || String(variant.const), unit: variant.const };
    const name = Object.keys(variant.properties || {})[0];
    return { title: variant.title || name, name, content: variant.properties[name] };
  });
  const select = el(
    "select",
    { name: path, "aria-label": path },
    variants.map((variant, i) => el("option", { value: String(i) }, variant.title)),
  );
  const slot = el("div", { class: "payload-variant" });
  let current = null;
  const pick = () => {
    const variant = variants[Number(select.value)];
    current = variant.unit !== undefined ? null : field(variant.content, root, variant.title, `${path}.${variant.name}`, depth + 1);
    slot.replaceChildren(...(current && current.node ? [current.node] : []));
  };
  select.addEventListener("change", pick);
  pick();
  const node = el("div", {}, labelled(schema.title || label, path, select), slot);
  const read = () => {
    const variant = variants[Number(select.value)];
    return variant.unit !== undefined ? variant.unit : { [variant.name]: current.read() };
  };
  return { node, read };
}

function jsonBox(label, path) {
  const input = el("textarea", { name: path, "aria-label": `${path} (JSON)`, rows: 2, cols: 30 });
  const read = () => {
    try {
      return JSON.parse(input.value);
    } catch (error) {
      throw new Error(`${path} is not JSON: ${error.message}`);
    }
  };
  return { node: labelled(`${label} (JSON)`, path, input), read };
}
