//! The OpenAPI 3.1 document of the routes, served at `GET /openapi.json`
//! (utoipa: generated from the same types the routes read and write).
//! Clients can be generated from it, and API fuzzers (schemathesis, in
//! scripts/api-fuzz.sh) test the server against it.

use super::openai::FREE_FORM_SCHEMAS;
use super::routes;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "starling",
        description = "An OpenAI-compatible server for Starling and other Mistral/Llama-style models: chat and raw completions (streamed as server-sent events or whole), models, vLLM's tokenize and detokenize, health and Prometheus metrics."
    ),
    paths(
        routes::chat_completions,
        routes::completions,
        routes::models,
        routes::model,
        routes::tokenize,
        routes::detokenize,
        routes::health,
        routes::metrics,
    ),
    modifiers(&BearerKey)
)]
pub struct ApiDoc;

/// `Authorization: Bearer KEY`, needed when the server was given a key.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document of a server that serves `names` (the model and its
/// aliases), as JSON, with the crate's version. Three edits to what utoipa
/// derives, so that the document says exactly what the server accepts
/// (API fuzzers generate requests from it, and a request built to the
/// schema is then one the server takes, or refuses for a reason the schema
/// cannot say, such as a prompt beyond the context):
/// - a free-form field (`serde_json::Value`) is "any value" to utoipa,
///   whose schema type cannot say `propertyNames` or `const`: those fields
///   get their schemas from [`FREE_FORM_SCHEMAS`], keeping their descriptions;
/// - `model` is one of `names` (another is a 404);
/// - a request that flattens [`Sampling`](super::openai::Sampling) is one
///   object, not an `allOf` (fuzzers mutate the fields of one object).
pub fn document(names: &[String]) -> Value {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut doc = serde_json::to_value(&doc).unwrap_or(Value::Null);
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return doc;
    };
    let model = serde_json::json!({
        "description": "The served model's name or an alias (left out: the served model).",
        "enum": names.iter().map(|n| Value::from(n.as_str())).chain([Value::Null]).collect::<Vec<_>>(),
    });
    // The requests' `model` (responses name the model as asked, always a string).
    for (name, schema) in schemas.iter_mut() {
        if (name == "Sampling" || name.ends_with("Request"))
            && let Some(slot) = schema.pointer_mut("/properties/model")
        {
            *slot = model.clone();
        }
    }
    let flat: Vec<(String, Value)> = schemas
        .iter()
        .filter_map(|(name, schema)| {
            let parts = schema.get("allOf")?.as_array()?;
            let mut properties = serde_json::Map::new();
            let mut required = Vec::new();
            for part in parts {
                let part = match part.get("$ref").and_then(Value::as_str) {
                    Some(r) => schemas.get(r.rsplit('/').next()?)?,
                    None => part,
                };
                if let Some(p) = part.get("properties").and_then(Value::as_object) {
                    properties.extend(p.clone());
                }
                if let Some(r) = part.get("required").and_then(Value::as_array) {
                    required.extend(r.iter().cloned());
                }
            }
            let merged = serde_json::json!({"type": "object", "properties": properties, "required": required});
            Some((name.clone(), merged))
        })
        .collect();
    for (name, merged) in flat {
        schemas.insert(name, merged);
    }
    for name in ["Sampling", "ChatRequest", "CompletionRequest"] {
        let Some(properties) = schemas
            .get_mut(name)
            .and_then(|s| s.get_mut("properties"))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        for (field, text) in FREE_FORM_SCHEMAS {
            let (Some(slot), Ok(Value::Object(mut schema))) = (
                properties.get_mut(field),
                serde_json::from_str::<Value>(text),
            ) else {
                continue;
            };
            if let Some(description) = slot.get("description") {
                schema.insert("description".into(), description.clone());
            }
            *slot = Value::Object(schema);
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route is documented, and every free-form field got its schema.
    #[test]
    fn the_document_describes_every_route_and_free_form_field() {
        let doc = document(&["tiny".to_string(), "alias".to_string()]);
        assert_eq!(doc["openapi"], "3.1.0");
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/v1/models/{id}",
            "/tokenize",
            "/detokenize",
            "/health",
            "/metrics",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
        let schemas = &doc["components"]["schemas"];
        // A chat request is one object with the sampling fields and `messages`.
        let chat = &schemas["ChatRequest"];
        assert!(chat.get("allOf").is_none(), "{chat}");
        assert_eq!(chat["required"], serde_json::json!(["messages"]));
        assert_eq!(
            chat["properties"]["model"]["enum"],
            serde_json::json!(["tiny", "alias", null])
        );
        let properties = &chat["properties"];
        for (field, text) in FREE_FORM_SCHEMAS {
            let schema: Value = serde_json::from_str(text).unwrap();
            let mut placed = properties[field].clone();
            assert!(
                placed["description"].is_string(),
                "{field} keeps its description"
            );
            placed.as_object_mut().unwrap().remove("description");
            assert_eq!(placed, schema, "{field}");
        }
    }
}
