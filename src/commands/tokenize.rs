//! `starling tokenize`: the ids of text, or of a conversation rendered by
//! the chat template, as one JSON array on one line.

use super::input;
use crate::cli::TokenizeArgs;
use crate::loader;
use anyhow::{Result, bail};

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let (files, template) = super::model_files(&args.model)?;
    let ids = if let Some(path) = &args.messages {
        if !args.text.is_empty() {
            bail!("give either text or --messages, not both");
        }
        let messages = input::read_messages(path)?;
        let text = loader::load_text(&files, &template)?;
        text.template.encode(&text.tokenizer, &messages)?
    } else {
        let raw = if args.text.is_empty() {
            match input::piped_stdin()? {
                Some(s) => s,
                None => {
                    bail!("nothing to tokenize: give text after `--`, --messages, or pipe text in")
                }
            }
        } else {
            args.text.join(" ")
        };
        let text = loader::load_text(&files, &template)?;
        text.tokenizer.encode_with_bos(&raw)?
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
