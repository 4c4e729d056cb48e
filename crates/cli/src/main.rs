//! `moestream`: run Mixture-of-Experts language models on the CPU.
//!
//! Commands: `run` (generate or chat), `score` (per-token log-probabilities as JSON), `perplexity`
//! (llama-perplexity's method), `serve` (an OpenAI-compatible HTTP server), `inspect` (what a checkpoint holds), `synth` (random-weight models
//! of real geometries).
mod bench;
mod commands;
mod device;
mod hub;
mod kl;
mod loaded;
mod serve;
mod synth;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "moestream",
    version,
    about = "Inference engine for Mixture-of-Experts models larger than memory"
)]
struct Cli {
    /// Worker threads for the kernels (default: one per core).
    #[arg(long, short = 't', global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, or chat interactively when no prompt is given.
    Run(commands::RunArgs),
    /// Print the log-probability of each token given the ones before it, as JSON.
    Score(commands::ScoreArgs),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(commands::PerplexityArgs),
    /// Time prefill and decode (llama-bench style), beside the measured memory bandwidth.
    Bench(bench::BenchArgs),
    /// Describe a checkpoint: architecture, geometry, quantization, expert and non-expert bytes.
    Inspect(commands::InspectArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Write a random-weight model of a real geometry (its output is noise).
    Synth(commands::SynthArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOESTREAM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
        {
            eprintln!("error: cannot start {n} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Run(a) => commands::run(a),
        Command::Score(a) => commands::score(a),
        Command::Perplexity(a) => commands::perplexity(a),
        Command::Bench(a) => bench::bench(a),
        Command::Inspect(a) => commands::inspect(a),
        Command::Synth(a) => commands::synth(a),
        Command::Serve(a) => serve::serve(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
