//! Picks the next token from logits.
//!
//! Order (as llama.cpp's default chain): repeat penalty over the last
//! `repeat_last_n` ids → greedy if temperature is 0 → top-k → top-p →
//! min-p (the last two on the untempered distribution) → temperature →
//! draw. candle-transformers' LogitsProcessor has no min-p or repeat
//! penalty, tempers before truncating, and allocates and sorts the whole
//! vocabulary every token; this keeps its buffers between tokens.

use anyhow::{Result, bail};
use candle_core::{DType, Device, Storage, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 means off.
    pub top_k: usize,
    /// 1.0 means off.
    pub top_p: f64,
    /// 0.0 means off.
    pub min_p: f64,
    /// 1.0 means off.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI's presence penalty: subtracted once from the logit of every
    /// token the answer already holds (prompt tokens do not count). 0 = off.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted per occurrence in the answer. 0 = off.
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: added to a token's logit before any other
    /// step (-100 all but bans it, 100 all but forces it). Ids are checked
    /// against the vocabulary by whoever builds the config.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Checks every value in the precision the sampler uses it in (f32).
    /// A temperature too small for an f32 (below about 1.4e-45) is greedy:
    /// dividing by it would make every weight NaN.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature must be a finite number >= 0");
        }
        if !(self.temperature as f32).is_finite() {
            bail!(
                "temperature {:e} is too large (at most {:e})",
                self.temperature,
                f32::MAX
            );
        }
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p as f32 == 0.0 {
            bail!("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("min_p must be in [0, 1]");
        }
        // Dividing logits by a penalty near 0 (or multiplying by a huge
        // one) overflows them to infinities: keep it where it means something.
        if !(0.001..=1000.0).contains(&self.repeat_penalty) {
            bail!(
                "repeat_penalty must be between 0.001 and 1000 (1 = off), not {:e}",
                self.repeat_penalty
            );
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                bail!("{name} must be between -2 and 2, not {value}");
            }
        }
        if let Some((id, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            bail!("logit_bias for token {id} must be between -100 and 100, not {bias}");
        }
        Ok(())
    }
}

/// The model's own log-probabilities at one position: log-softmax of the
/// raw logits, before any sampler step (penalties, bias, temperature,
/// truncation), as OpenAI's `logprobs` report them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Natural log of the drawn token's probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely
    /// first (ties by id): as many as asked.
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    config: SamplerConfig,
    rng: StdRng,
    logits: Vec<f32>,
    /// The raw logits, kept only while log-probabilities are asked for.
    raw: Vec<f32>,
    candidates: Vec<(f32, u32)>,
    recent: Vec<u32>,
    /// How often each token was drawn in this answer (for the presence and
    /// frequency penalties), in order of first draw.
    drawn: Vec<(u32, u32)>,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self {
            config,
            rng,
            logits: Vec::new(),
            raw: Vec::new(),
            candidates: Vec::new(),
            recent: Vec::new(),
            drawn: Vec::new(),
        }
    }

    /// Next token given `logits` (`[vocab]`) and the ids so far (for the penalty).
    ///
    /// Errors when the model produced no finite logit at all (NaN and
    /// infinities come from broken weights): no NaN ever reaches the draw.
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        copy_logits(logits, &mut self.logits)?;
        self.sample_from_buffer(history)
    }

    /// [`Self::sample`], with the model's log-probabilities at this
    /// position: the drawn token's and the `top` most likely (0..=20 in
    /// OpenAI's API; any number here).
    pub fn sample_with_logprobs(
        &mut self,
        logits: &Tensor,
        history: &[u32],
        top: usize,
    ) -> Result<(u32, TokenLogprobs)> {
        copy_logits(logits, &mut self.logits)?;
        self.raw.clone_from(&self.logits);
        let (log_total, alternatives) = self.log_softmax_top(top);
        let token = self.sample_from_buffer(history)?;
        let logprob = self.raw[token as usize] - log_total;
        Ok((
            token,
            TokenLogprobs {
                logprob,
                top: alternatives,
            },
        ))
    }

    /// log Σ exp(logit) over the finite logits in the buffer, and the `top`
    /// largest as (id, log-probability). Uses the candidate buffer, which
    /// the draw refills.
    fn log_softmax_top(&mut self, top: usize) -> (f32, Vec<(u32, f32)>) {
        let finite = || self.logits.iter().copied().filter(|l| l.is_finite());
        let max = finite().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // No distribution: the draw reports the error.
            return (0.0, Vec::new());
        }
        let log_total = max + finite().map(|l| (l - max).exp()).sum::<f32>().ln();
        self.candidates.clear();
        self.candidates.extend(
            self.logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (l, i as u32)),
        );
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let top = top.min(self.candidates.len());
        if top == 0 {
            return (log_total, Vec::new());
        }
        if top < self.candidates.len() {
            self.candidates.select_nth_unstable_by(top - 1, order);
            self.candidates.truncate(top);
        }
        self.candidates.sort_unstable_by(order);
        let alternatives = self
            .candidates
            .iter()
            .map(|&(l, id)| (id, l - log_total))
            .collect();
        (log_total, alternatives)
    }

    /// [`Self::sample`] over plain values, for callers (and tests) that hold
    /// the logits as a slice.
    pub fn sample_slice(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        self.logits.clear();
        self.logits.extend_from_slice(logits);
        self.sample_from_buffer(history)
    }

    fn sample_from_buffer(&mut self, history: &[u32]) -> Result<u32> {
        for &(id, bias) in &self.config.logit_bias {
            if let Some(l) = self.logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        self.apply_answer_penalties();
        let token = self.draw(history)?;
        if self.config.presence_penalty != 0.0 || self.config.frequency_penalty != 0.0 {
            match self.drawn.iter_mut().find(|(id, _)| *id == token) {
                Some((_, n)) => *n += 1,
                None => self.drawn.push((token, 1)),
            }
        }
        Ok(token)
    }

    /// OpenAI's presence and frequency penalties over this answer's tokens:
    /// `logit -= count * frequency + (count > 0) * presence`
    /// (<https://platform.openai.com/docs/advanced-usage/parameter-details>).
    fn apply_answer_penalties(&mut self) {
        let (presence, frequency) = (self.config.presence_penalty, self.config.frequency_penalty);
        for &(id, n) in &self.drawn {
            if let Some(l) = self.logits.get_mut(id as usize) {
                *l -= n as f32 * frequency + presence;
            }
        }
    }

    fn draw(&mut self, history: &[u32]) -> Result<u32> {
        self.apply_repeat_penalty(history);
        // NaN and +inf logits are not a distribution: they are dropped, so
        // one broken value cannot become a certain (or NaN) draw.
        let mut finite = false;
        for l in &mut self.logits {
            if l.is_finite() {
                finite = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if !finite {
            bail!("the model produced no finite logits (NaN or infinite weights?)");
        }
        // The temperature is used as an f32: one that rounds to 0 is greedy.
        let t = self.config.temperature as f32;
        if t == 0.0 {
            return Ok(argmax(&self.logits));
        }
        self.candidates.clear();
        self.candidates
            .extend(self.logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        let k = self.config.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);

        // Untempered probabilities for top-p and min-p.
        let max = self.candidates[0].0;
        let total: f32 = self.candidates.iter().map(|c| (c.0 - max).exp()).sum();
        if self.config.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                cumulative += (c.0 - max).exp() / total;
                if cumulative >= self.config.top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
        }
        if self.config.min_p > 0.0 {
            // p_i >= min_p * p_max  ⇔  logit_i - max >= ln(min_p)
            let floor = (self.config.min_p as f32).ln();
            let keep = self
                .candidates
                .iter()
                .take_while(|c| c.0 - max >= floor)
                .count()
                .max(1);
            self.candidates.truncate(keep);
        }

        // Impossible tokens (-inf: non-finite logits, or a penalty) are never drawn.
        let possible = self
            .candidates
            .iter()
            .take_while(|c| c.0 > f32::NEG_INFINITY)
            .count()
            .max(1);
        self.candidates.truncate(possible);

        let weights_total: f32 = self
            .candidates
            .iter()
            .map(|c| ((c.0 - max) / t).exp())
            .sum();
        let mut draw = self.rng.random::<f32>() * weights_total;
        for c in &self.candidates {
            draw -= ((c.0 - max) / t).exp();
            if draw <= 0.0 {
                return Ok(c.1);
            }
        }
        Ok(self.candidates.last().expect("at least one candidate").1)
    }

    fn apply_repeat_penalty(&mut self, history: &[u32]) {
        let penalty = self.config.repeat_penalty;
        if penalty == 1.0 || self.config.repeat_last_n == 0 {
            return;
        }
        let start = history.len().saturating_sub(self.config.repeat_last_n);
        self.recent.clear();
        self.recent.extend_from_slice(&history[start..]);
        self.recent.sort_unstable();
        self.recent.dedup();
        for &id in &self.recent {
            if let Some(l) = self.logits.get_mut(id as usize) {
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }
}

/// First index of the largest value (as torch.argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Copies a `[vocab]` f32 tensor into `out`, reusing its allocation on CPU.
fn copy_logits(logits: &Tensor, out: &mut Vec<f32>) -> Result<()> {
    let logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("logits did not reach the CPU")
    };
    let data = cpu.as_slice::<f32>()?;
    let n = layout.shape().elem_count();
    match layout.contiguous_offsets() {
        Some((start, end)) => {
            out.clear();
            out.extend_from_slice(&data[start..end]);
        }
        None => {
            drop(storage);
            *out = logits.flatten_all()?.to_vec1::<f32>()?;
        }
    }
    debug_assert_eq!(out.len(), n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    fn config(temperature: f64) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 7,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(config(0.0));
        assert_eq!(s.sample(&tensor(&[1.0, 3.0, 3.0, 2.0]), &[]).unwrap(), 1);
    }

    #[test]
    fn repeat_penalty_can_change_the_greedy_choice() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 2.0,
            ..config(0.0)
        });
        // 3.0/2 = 1.5 < 2.0, so a recently seen id 1 loses to id 3.
        assert_eq!(s.sample(&tensor(&[1.0, 3.0, -1.0, 2.0]), &[1]).unwrap(), 3);
    }

    #[test]
    fn top_k_and_min_p_restrict_the_draw() {
        let logits = tensor(&[5.0, 4.9, 0.0, -3.0, 4.8]);
        let mut top1 = Sampler::new(SamplerConfig {
            top_k: 1,
            ..config(1.0)
        });
        let mut min_p = Sampler::new(SamplerConfig {
            min_p: 0.5,
            ..config(5.0)
        });
        for _ in 0..200 {
            assert_eq!(top1.sample(&logits, &[]).unwrap(), 0);
            let t = min_p.sample(&logits, &[]).unwrap();
            assert!([0, 1, 4].contains(&t), "min_p let {t} through");
        }
    }

    /// Property: for random logits (with ties, huge values, NaN and
    /// infinities) and random settings (0, tiny, huge), the sampler either
    /// returns a token that top-k, top-p and min-p allow, or the settings
    /// fail validation. The allowed set is computed here independently.
    #[test]
    fn every_draw_is_allowed_by_the_truncations() {
        let mut rng = StdRng::seed_from_u64(11);
        let specials = [
            0.0,
            1e-46,
            1e-45,
            1e-30,
            1e-6,
            0.5,
            1.0,
            2.0,
            1e30,
            1e39,
            f64::NAN,
            f64::INFINITY,
            -1.0,
        ];
        let pick = |rng: &mut StdRng, lo: f64, hi: f64| -> f64 {
            if rng.random::<f32>() < 0.4 {
                specials[rng.random_range(0..specials.len())]
            } else {
                rng.random_range(lo..hi)
            }
        };
        let (mut drawn, mut refused) = (0, 0);
        for case in 0..5000 {
            let n = rng.random_range(1..40);
            let logits: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..20) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    3 => 3e38,
                    4 => -3e38,
                    5 => 1.0, // ties
                    _ => rng.random_range(-20.0..20.0),
                })
                .collect();
            let config = SamplerConfig {
                temperature: pick(&mut rng, 0.0, 5.0),
                top_k: [0, 1, 2, 5, 100][rng.random_range(0..5)],
                top_p: pick(&mut rng, 0.0, 1.0),
                min_p: pick(&mut rng, 0.0, 1.0),
                repeat_penalty: [1.0, 1e-45, 0.5, 2.0, 1e30][rng.random_range(0..5)],
                repeat_last_n: 0,
                presence_penalty: [0.0, 0.0, -2.0, 2.0][rng.random_range(0..4)],
                frequency_penalty: [0.0, 0.0, -1.5, 1.5][rng.random_range(0..4)],
                logit_bias: match rng.random_range(0..4) {
                    0 => vec![(
                        rng.random_range(0..n as u32),
                        pick(&mut rng, -100.0, 100.0) as f32,
                    )],
                    1 => vec![(n as u32 + 5, 100.0), (0, -100.0)],
                    2 => vec![(0, f32::NAN)],
                    _ => Vec::new(),
                },
                seed: case,
            };
            if config.validate().is_err() {
                refused += 1;
                continue;
            }
            let mut sampler = Sampler::new(config.clone());
            let result = sampler.sample_slice(&logits, &[]);
            let mut clean: Vec<f32> = logits
                .iter()
                .map(|&l| if l.is_finite() { l } else { f32::NEG_INFINITY })
                .collect();
            // The bias comes first: the truncations see the biased logits.
            for &(id, bias) in &config.logit_bias {
                if let Some(l) = clean.get_mut(id as usize) {
                    *l += bias;
                }
            }
            let Some(max) = clean
                .iter()
                .copied()
                .filter(|l| l.is_finite())
                .reduce(f32::max)
            else {
                assert!(
                    result.is_err(),
                    "case {case}: no finite logit must be an error"
                );
                continue;
            };
            let token = result.unwrap() as usize;
            drawn += 1;
            let l = clean[token];
            let what = format!("case {case}: {logits:?} {config:?} drew {token}");
            assert!(l.is_finite(), "{what}: a non-finite logit");
            if config.temperature as f32 == 0.0 {
                assert_eq!(l, max, "{what}: greedy must take the maximum");
                continue;
            }
            let greater = clean.iter().filter(|&&x| x > l).count();
            if config.top_k > 0 {
                assert!(greater < config.top_k, "{what}: outside top-k");
            }
            // Probabilities as f64 from the f32 logits.
            let total: f64 = clean.iter().map(|&x| ((x - max) as f64).exp()).sum();
            let p = |x: f32| ((x - max) as f64).exp() / total;
            if config.min_p > 0.0 {
                assert!(
                    p(l) >= config.min_p * p(max) * (1.0 - 1e-4),
                    "{what}: below min-p"
                );
            }
            if config.top_p < 1.0 {
                let mass_above: f64 = clean.iter().filter(|&&x| x > l).map(|&x| p(x)).sum();
                assert!(mass_above < config.top_p + 1e-4, "{what}: outside top-p");
            }
        }
        assert!(
            drawn > 1000 && refused > 100,
            "drawn {drawn}, refused {refused}"
        );
    }

    #[test]
    fn a_temperature_that_underflows_f32_is_greedy() {
        let logits = [0.0, 5.0, 4.99, 1.0];
        for t in [1e-46, 1e-300] {
            let mut s = Sampler::new(config(t));
            assert!(s.config.validate().is_ok());
            for _ in 0..50 {
                assert_eq!(s.sample_slice(&logits, &[]).unwrap(), 1, "temperature {t}");
            }
        }
    }

    #[test]
    fn a_repeat_penalty_that_would_overflow_the_logits_is_refused() {
        for p in [1e-45f32, 1e-4, 1e4, f32::MAX] {
            let c = SamplerConfig {
                repeat_penalty: p,
                ..config(1.0)
            };
            assert!(c.validate().is_err(), "{p}");
        }
        let c = SamplerConfig {
            repeat_penalty: 0.001,
            repeat_last_n: 64,
            ..config(1.0)
        };
        c.validate().unwrap();
        // Penalised logits stay finite, so every draw is a real token.
        let mut s = Sampler::new(c);
        for _ in 0..50 {
            let t = s.sample_slice(&[30.0, -30.0, 29.0], &[0, 1]).unwrap();
            assert!(t < 3);
        }
    }

    #[test]
    fn nan_logits_are_never_drawn() {
        let logits = [f32::NAN, 1.0, f32::NAN, 0.5, f32::INFINITY];
        let mut s = Sampler::new(config(1.0));
        for _ in 0..200 {
            let t = s.sample_slice(&logits, &[]).unwrap();
            assert!(t == 1 || t == 3, "drew {t}");
        }
        let mut s = Sampler::new(config(0.0));
        assert_eq!(s.sample_slice(&logits, &[]).unwrap(), 1);
        assert!(s.sample_slice(&[f32::NAN; 4], &[]).is_err());
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits = tensor(&[1.0, 1.1, 0.9, 1.05, 0.95, 1.02]);
        let draw = |seed| {
            let mut s = Sampler::new(SamplerConfig {
                seed,
                ..config(1.0)
            });
            (0..50)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    /// The penalties count the answer's own draws, not the prompt: a token
    /// drawn once loses `presence + frequency`, twice `presence + 2 frequency`.
    #[test]
    fn presence_and_frequency_penalties_count_the_answer_only() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            presence_penalty: 0.5,
            frequency_penalty: 1.0,
            ..SamplerConfig::default()
        });
        // The prompt (history) holds token 0: no penalty for it.
        assert_eq!(s.sample_slice(&[3.0, 2.0, 0.0], &[0, 0, 0]).unwrap(), 0);
        // Token 0 drawn once: 3.0 - 1.5 = 1.5 < 2.0.
        assert_eq!(s.sample_slice(&[3.0, 2.0, 0.0], &[0]).unwrap(), 1);
        // Token 1 drawn once (0.5), token 0 once: 4.0 - 1.5 = 2.5 > 3.1 - 1.5 = 1.6.
        assert_eq!(s.sample_slice(&[4.0, 3.1, 0.0], &[]).unwrap(), 0);
        // Token 0 now twice: 4.0 - 2.5 = 1.5 < 3.1 - 1.5 = 1.6.
        assert_eq!(s.sample_slice(&[4.0, 3.1, 0.0], &[]).unwrap(), 1);
        for bad in [2.5, -2.5, f32::NAN, f32::INFINITY] {
            let c = SamplerConfig {
                frequency_penalty: bad,
                ..SamplerConfig::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    /// A bias moves a token's logit before anything else: +100 makes an
    /// unlikely token the greedy choice, -100 bans the likely one; values
    /// outside [-100, 100] (or NaN) are refused.
    #[test]
    fn logit_bias_shifts_the_draw() {
        let logits = [5.0, 1.0, 0.0];
        let greedy = |bias: Vec<(u32, f32)>| {
            Sampler::new(SamplerConfig {
                temperature: 0.0,
                logit_bias: bias,
                ..SamplerConfig::default()
            })
            .sample_slice(&logits, &[])
            .unwrap()
        };
        assert_eq!(greedy(vec![]), 0);
        assert_eq!(greedy(vec![(2, 100.0)]), 2);
        assert_eq!(greedy(vec![(0, -100.0)]), 1);
        // An id beyond the logits is ignored here (the server refuses it).
        assert_eq!(greedy(vec![(99, 100.0)]), 0);
        for bad in [100.5, -101.0, f32::NAN] {
            let c = SamplerConfig {
                logit_bias: vec![(1, bad)],
                ..SamplerConfig::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    /// Log-probabilities are the raw distribution's (log-softmax), not the
    /// biased or tempered one's, and the alternatives come most likely first.
    #[test]
    fn logprobs_are_the_raw_log_softmax() {
        let logits = [2.0f32, 1.0, 3.0, f32::NAN, 0.5];
        let finite = [2.0f32, 1.0, 3.0, 0.5];
        let total: f32 = finite.iter().map(|l| l.exp()).sum();
        let expect = |l: f32| l - total.ln();
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            logit_bias: vec![(1, 100.0)],
            ..SamplerConfig::default()
        });
        let (token, lp) = s.sample_with_logprobs(&tensor(&logits), &[], 3).unwrap();
        // The bias made token 1 the choice; its logprob is still the raw one.
        assert_eq!(token, 1);
        assert!((lp.logprob - expect(1.0)).abs() < 1e-5, "{lp:?}");
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [2, 0, 1]);
        for (id, value) in &lp.top {
            assert!((value - expect(logits[*id as usize])).abs() < 1e-5);
        }
        // Probabilities over the whole vocabulary sum to 1.
        let (_, all) = s.sample_with_logprobs(&tensor(&logits), &[], 10).unwrap();
        assert_eq!(all.top.len(), 4, "NaN is no candidate");
        let sum: f32 = all.top.iter().map(|t| t.1.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-5);
        // Asking for none gives the chosen token's only.
        let (_, none) = s.sample_with_logprobs(&tensor(&logits), &[], 0).unwrap();
        assert!(none.top.is_empty());
    }
}
