//! Integration tests of the `moestream` binary. One test binary (faster to link on small machines).
mod bad_input;
mod cli;
mod common;
mod cuda;
mod gguf;
mod hybrid_state;
mod kl;
mod reference;
mod server;
mod speculative;
mod streaming;
