//! Which engine runs a model: tract, in-process and always there, or ONNX Runtime, when its
//! library can be found (`exec::ort`).
//!
//! `Engine::Auto`, the default, picks per comparison. It runs a model in ONNX Runtime when it
//! holds `com.microsoft` operators (built for ONNX Runtime: its kernels, not our lowerings of
//! them, are the ground truth) or when tract cannot run it faithfully, and in tract
//! otherwise. The reference of a comparison runs in tract only when it is a float model of
//! standard operators; else both run in one engine: the engines round differently, and a
//! model that quantizes its activations turns a last-bit difference into a quantization
//! step, so a comparison across engines would measure the engines, not the rewrite.
//! `second_opinion` is ONNX Runtime, asked again when tract fails to run a model or finds
//! two models apart (tract has gaps of its own: it casts float to int64 through int32).

use tract_onnx::prelude::Tensor;

use super::ort::OrtRunner;
use super::rows::{Run, Runs};
use super::{support, Batch, ExecError, InputSpec, Runner};
use crate::ir::Model;
use crate::ops::{self, MS_DOMAIN};

/// The engine a user asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Tract,
    Ort,
    /// tract, or ONNX Runtime where it is the faithful one (see the module doc).
    #[default]
    Auto,
}

/// An engine that runs models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Tract,
    #[serde(rename = "onnxruntime")]
    Ort,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Tract => "tract",
            EngineKind::Ort => "ONNX Runtime",
        }
    }
}

impl Engine {
    /// The engine to run all of `models` in (see the module doc).
    pub fn choose(self, models: &[&Model]) -> EngineKind {
        match self {
            Engine::Tract => EngineKind::Tract,
            Engine::Ort => EngineKind::Ort,
            Engine::Auto => {
                let ort = super::ort::available().is_ok();
                let contrib = models.iter().any(|m| holds_contrib_ops(m));
                let tract_refuses = || models.iter().any(|m| tract_refusal(m).is_some());
                if ort && (contrib || tract_refuses()) {
                    EngineKind::Ort
                } else {
                    EngineKind::Tract
                }
            }
        }
    }

    /// The engines to run a comparison's `reference` and `candidate` in: the candidate where
    /// `choose` puts it; with `Auto`, a reference of standard float operators that tract runs
    /// goes to tract (the engines then agree to float rounding, and tract loads a model in
    /// a third of ONNX Runtime's time), anything else to the candidate's engine.
    pub fn choose_pair(self, reference: &Model, candidate: &Model) -> (EngineKind, EngineKind) {
        let for_candidate = self.choose(&[candidate]);
        let plain = |m: &Model| {
            !holds_contrib_ops(m)
                && !m
                    .graph
                    .nodes()
                    .any(|(_, n)| ops::quantization::quantizes(n))
                && tract_refusal(m).is_none()
        };
        if self == Engine::Auto && plain(reference) {
            (EngineKind::Tract, for_candidate)
        } else {
            let both = self.choose(&[reference, candidate]);
            (both, both)
        }
    }

    /// ONNX Runtime, to retry a comparison in after tract failed to run a model or found
    /// the two apart: only when the choice was ours (`Auto`) and ONNX Runtime is there.
    pub fn second_opinion(self) -> Option<EngineKind> {
        (self == Engine::Auto && super::ort::available().is_ok()).then_some(EngineKind::Ort)
    }
}

fn holds_contrib_ops(model: &Model) -> bool {
    model.graph.nodes().any(|(_, n)| n.domain() == MS_DOMAIN)
}

/// Why tract cannot run `model` faithfully, once its contrib operators are lowered.
pub fn tract_refusal(model: &Model) -> Option<support::Unsupported> {
    let mut lowered = model.clone();
    super::lower::lower_contrib_ops(&mut lowered).ok()?;
    support::first_unsupported(&lowered)
}

/// Runs `model` on every batch in order, in the engine `engine` picks for it, and hands
/// `each(run, values)` the values `names` took in that run, with what ran (`rows::Run`): a
/// batch whose values would take much memory runs a few rows at a time (`rows::runs`). In
/// tract, as many runs at once as threads while their values take at most half the weights
/// (`batches_at_once`; tract runs each on one core; handing them over in order keeps
/// statistics independent of the thread count, and memory holds one chunk's values); in
/// ONNX Runtime (where `Engine::Auto` puts a model tract cannot run faithfully: a boolean
/// mask on the standard Attention, a contrib operator tract lacks; or one tract fails to
/// run), one run at a time, which parallelizes inside each run. When tract fails part-way,
/// the runs start again in ONNX Runtime from the first: a run of index 0 means start over,
/// so a caller that accumulates resets there.
pub fn for_each_batch<E: From<ExecError>>(
    model: &Model,
    engine: Engine,
    names: &[String],
    batches: &[Batch],
    mut each: impl FnMut(Run, Vec<(String, Tensor)>) -> Result<(), E>,
) -> Result<(), E> {
    let runs = super::rows::runs(model, names, batches);
    let mut kind = engine.choose(&[model]);
    if kind == EngineKind::Tract {
        match in_tract(model, names, &runs, &mut each) {
            Ok(()) => return Ok(()),
            Err(Stopped::Each(e)) => return Err(e),
            // tract failed on a batch (the KV-cache exports' `Range` of a length it cannot
            // resolve at a past of 0): ONNX Runtime runs them all again from the first, as
            // validation asks it again (`second_opinion`); `each(0, …)` starts over.
            Err(Stopped::Engine(e)) => match engine.second_opinion() {
                Some(ort) => kind = ort,
                None => return Err(e.into()),
            },
        }
    }
    let mut runner = EngineRunner::with_outputs(kind, model, names)?;
    for (index, batch) in runs.batches.iter().enumerate() {
        each(runs.run(index), runner.run(batch)?)?;
    }
    Ok(())
}

/// Why `in_tract` stopped: the engine, or `each`.
enum Stopped<E> {
    Engine(ExecError),
    Each(E),
}

/// `for_each_batch` in tract: the first batch alone, then as many at once as
/// `batches_at_once` allows for what the first one's values took.
fn in_tract<E>(
    model: &Model,
    names: &[String],
    runs: &Runs,
    each: &mut impl FnMut(Run, Vec<(String, Tensor)>) -> Result<(), E>,
) -> Result<(), Stopped<E>> {
    let batches = &runs.batches;
    let mut runner = Runner::with_outputs(model, names).map_err(|e| Stopped::Engine(e))?;
    runner.prepare(batches).map_err(|e| Stopped::Engine(e))?;
    let weights = model.graph.initializer_bytes();
    let (mut done, mut at_once) = (0, 1);
    while done < batches.len() {
        let chunk = &batches[done..batches.len().min(done + at_once)];
        let outputs = runner.run_parallel(chunk).map_err(|e| Stopped::Engine(e))?;
        if let (0, Some(first)) = (done, outputs.first()) {
            let held = first.iter().map(|(_, t)| value_bytes(t)).sum();
            at_once = batches_at_once(held, weights, super::parallel_batches());
        }
        for outputs in outputs {
            each(runs.run(done), outputs).map_err(Stopped::Each)?;
            done += 1;
        }
    }
    Ok(())
}

/// How many batches tract runs at once, when one batch's requested values take `held` bytes
/// and the model's weights `weights`: one per thread, as tract runs each on one core, as long
/// as the values of the batches in flight take at most half the weights (or `SMALL_VALUES`,
/// for a model of small weights). Every batch's values
/// are held until its run ends (the values calibration observes are the plan's outputs), so
/// large batches run in parallel would hold several times the weights (BERT-base's 49
/// calibrated activations take 260 MB a batch of 8×128, next to 438 MB of weights). The
/// outcome is the same either way: the batches are handed over in order.
fn batches_at_once(held: usize, weights: usize, threads: usize) -> usize {
    ((weights / 2).max(SMALL_VALUES) / held.max(1)).clamp(1, threads.max(1))
}

/// What the values of the batches in flight may take whatever the weights.
const SMALL_VALUES: usize = 64 << 20;

/// The bytes `t`'s elements take.
fn value_bytes(t: &Tensor) -> usize {
    t.len() * t.datum_type().size_of()
}

/// A model loaded into one engine.
pub enum EngineRunner {
    Tract(Box<Runner>),
    Ort(OrtRunner),
}

impl EngineRunner {
    /// Loads `model` into `engine`, returning the named values when run.
    pub fn with_outputs(
        engine: EngineKind,
        model: &Model,
        outputs: &[String],
    ) -> Result<EngineRunner, ExecError> {
        Ok(match engine {
            EngineKind::Tract => {
                EngineRunner::Tract(Box::new(Runner::with_outputs(model, outputs)?))
            }
            EngineKind::Ort => EngineRunner::Ort(OrtRunner::with_outputs(model, outputs)?),
        })
    }

    /// Loads `model` into `engine`, returning its graph outputs when run.
    pub fn new(engine: EngineKind, model: &Model) -> Result<EngineRunner, ExecError> {
        EngineRunner::with_outputs(engine, model, &model.graph.output_names())
    }

    pub fn kind(&self) -> EngineKind {
        match self {
            EngineRunner::Tract(_) => EngineKind::Tract,
            EngineRunner::Ort(_) => EngineKind::Ort,
        }
    }

    pub fn inputs(&self) -> &[InputSpec] {
        match self {
            EngineRunner::Tract(r) => r.inputs(),
            EngineRunner::Ort(r) => r.inputs(),
        }
    }

    pub fn prepare(&mut self, batches: &[Batch]) -> Result<(), ExecError> {
        match self {
            EngineRunner::Tract(r) => r.prepare(batches),
            EngineRunner::Ort(r) => r.prepare(batches),
        }
    }

    pub fn run(&mut self, batch: &Batch) -> Result<Vec<(String, Tensor)>, ExecError> {
        match self {
            EngineRunner::Tract(r) => r.run(batch),
            EngineRunner::Ort(r) => r.run(batch),
        }
    }

    pub fn run_parallel(
        &mut self,
        batches: &[Batch],
    ) -> Result<Vec<Vec<(String, Tensor)>>, ExecError> {
        match self {
            EngineRunner::Tract(r) => r.run_parallel(batches),
            EngineRunner::Ort(r) => r.run_parallel(batches),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_run_in_parallel_while_their_values_take_at_most_half_the_weights() {
        let mb = 1 << 20;
        // BERT-base (438 MB of weights): 1×128 batches' 49 activations take 33 MB, 8×128
        // batches' 260 MB.
        assert_eq!(batches_at_once(33 * mb, 438 * mb, 2), 2);
        assert_eq!(batches_at_once(260 * mb, 438 * mb, 2), 1);
        assert_eq!(batches_at_once(33 * mb, 438 * mb, 16), 6);
        // Never fewer than one, never more than the threads; a run returning nothing runs
        // one batch per thread.
        assert_eq!(batches_at_once(4 * 438 * mb, 438 * mb, 2), 1);
        assert_eq!(batches_at_once(0, 438 * mb, 4), 4);
        assert_eq!(batches_at_once(mb, 438 * mb, 0), 1);
        // Small values run in parallel whatever the weights; large ones do not.
        assert_eq!(batches_at_once(mb, 0, 4), 4);
        assert_eq!(batches_at_once(64 * mb, 4 * mb, 4), 1);
    }
}
