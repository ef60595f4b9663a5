//! Real chat templates, as models publish them (llama.cpp's collection in
//! the llama-cpp-python 0.3.36 source package), render to exactly the text
//! Python's jinja2 renders in transformers' `apply_chat_template`
//! environment, and fail where it fails. The reference renderings come from
//! `scripts/reference-templates.py` (tests/data/template-renderings.json,
//! with each template's sha256 so a changed source cannot pass unnoticed).

mod common;

use serde_json::Value;
use sha2::{Digest, Sha256};
use starling::template::{JinjaTemplate, Message};

/// Added tokens the rendered text is split on; conversation 4 writes some
/// of them in its messages, which must come back as written.
const SPECIALS: [&str; 6] = [
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
];

#[test]
fn real_templates_render_as_transformers_does() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("tests/data/template-renderings.json"))
            .unwrap(),
    )
    .unwrap();
    // SAFETY: this test binary has one test; nothing reads the environment concurrently.
    unsafe { std::env::set_var("STARLING_NOW", reference["now_unix"].to_string()) };
    let vars = &reference["variables"];
    let conversations: Vec<Vec<Message>> =
        serde_json::from_value(reference["conversations"].clone()).unwrap();
    let dir = common::templates_dir();
    let (mut checked, mut failures) = (0, Vec::new());
    let templates = reference["templates"].as_array().unwrap();
    for t in templates {
        let name = t["name"].as_str().unwrap();
        let source = match t["source"].as_str() {
            Some(inline) => inline.to_string(),
            None => std::fs::read_to_string(dir.join(name)).unwrap(),
        };
        let digest = format!("{:x}", Sha256::digest(source.as_bytes()));
        assert_eq!(digest, t["sha256"].as_str().unwrap(), "{name} changed");
        let compiled = JinjaTemplate::new(
            &source,
            Some(vars["bos_token"].as_str().unwrap().into()),
            Some(vars["eos_token"].as_str().unwrap().into()),
            SPECIALS.map(String::from).to_vec(),
        )
        .map(|j| {
            j.with_variable("unk_token", vars["unk_token"].as_str().unwrap())
                .with_variable("pad_token", vars["pad_token"].as_str().unwrap())
        });
        let Some(renders) = t["renders"].as_array() else {
            checked += 1;
            if compiled.is_ok() {
                failures.push(format!(
                    "{name}: jinja2 could not compile it, starling could"
                ));
            }
            continue;
        };
        let template = match compiled {
            Ok(j) => j,
            Err(e) => {
                failures.push(format!("{name}: does not compile: {e:#}"));
                continue;
            }
        };
        for (i, (want, messages)) in renders.iter().zip(&conversations).enumerate() {
            checked += 1;
            let got = template.render_text(messages);
            match (want.get("text").and_then(Value::as_str), got) {
                (Some(want), Ok(got)) if want == got => {}
                (Some(want), Ok(got)) => failures.push(format!(
                    "{name} #{i}: renders differently\n--- jinja2\n{want}\n--- starling\n{got}"
                )),
                (Some(_), Err(e)) => failures.push(format!("{name} #{i}: fails: {e:#}")),
                (None, Ok(_)) => failures.push(format!(
                    "{name} #{i}: jinja2 fails ({}), starling renders",
                    want["error"]
                )),
                (None, Err(_)) => {}
            }
        }
    }
    eprintln!(
        "{} templates, {checked} renderings checked, {} differ",
        templates.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
