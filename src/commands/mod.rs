//! One file per subcommand. Each is a client of the library: it gathers
//! input, calls the loader and the engine, and prints.

pub mod chat;
pub mod input;
pub mod run;
pub mod tokenize;
