//! Explaining one prediction: how much each input feature moved each output.
//!
//! The model is a black box here. An explanation runs it on rows made from the input
//! row, with some features replaced by a baseline's values, and reads the attributions
//! off the outputs. The rows go through the ordinary inference path, so explaining a
//! version costs what inference on it costs and needs nothing a runtime does not have.
//!
//! Two methods:
//! - Shapley values, exact: every coalition of features (2^features rows). Each feature
//!   gets its average marginal effect over all orders of adding features to the baseline,
//!   and the attributions add up to prediction − baseline prediction (efficiency).
//! - Ablation (also called occlusion): one row per feature, with that feature alone set to
//!   the baseline; a feature's attribution is how much the prediction falls without it.
//!   Cheap for many features, but the attributions need not add up when features interact.
//!
//! Pure: no IO, tested with properties of the methods on functions known in closed form.

use serde::{Deserialize, Serialize};

/// Most features an exact Shapley explanation takes: 2^10 = 1,024 model rows for each row
/// explained, as many as one inference request carries. Beyond it, ablation.
pub const SHAPLEY_FEATURES_MAX: usize = 10;

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Shapley,
    Ablation,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Shapley => "shapley",
            Method::Ablation => "ablation",
        }
    }
}

/// What one explained row needs run, and how to read the answers back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    method: Method,
    features: usize,
}

/// One row's explanation, for a model output of `k` values per row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// The model's output for the row itself (`k` values).
    pub prediction: Vec<f32>,
    /// The model's output for the baseline row (`k` values).
    pub baseline_prediction: Vec<f32>,
    /// `attributions[j][i]`: how much feature `i` moved output value `j`.
    pub attributions: Vec<Vec<f32>>,
}

impl Plan {
    /// A plan for rows of `features` values, or why the method cannot explain them.
    pub fn new(method: Method, features: usize) -> Result<Plan, String> {
        if features == 0 {
            return Err("the input has no features to explain".into());
        }
        if method == Method::Shapley && features > SHAPLEY_FEATURES_MAX {
            return Err(format!(
                "exact Shapley values for {features} features would take 2^{features} model \
                 rows per row; the limit is {SHAPLEY_FEATURES_MAX} features (ask for method \
                 \"ablation\", one row per feature)"
            ));
        }
        Ok(Plan { method, features })
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// Model rows run for each row explained.
    pub fn rows(&self) -> usize {
        match self.method {
            Method::Shapley => 1 << self.features,
            // The baseline, the row itself, then the row without each feature.
            Method::Ablation => self.features + 2,
        }
    }

    /// Appends the model rows for `row` to `out`, `rows()` rows of `features` values.
    #[cfg(test)]
    pub fn compose(&self, row: &[f32], baseline: &[f32], out: &mut Vec<f32>) {
        for index in 0..self.rows() {
            self.compose_row(index, row, baseline, out);
        }
    }

    /// Appends model row `index` (below `rows()`) for `row` to `out`, `features` values.
    ///
    /// Shapley: row `mask` takes feature `i` from `row` where bit `i` of `mask` is set and
    /// from `baseline` otherwise, so row 0 is the baseline and the last row is `row`.
    /// Ablation: the baseline, `row`, then `row` with feature `i` from the baseline.
    pub fn compose_row(&self, index: usize, row: &[f32], baseline: &[f32], out: &mut Vec<f32>) {
        assert_eq!(row.len(), self.features, "a row of the plan's features");
        assert_eq!(
            baseline.len(),
            self.features,
            "a baseline of the plan's features"
        );
        assert!(index < self.rows(), "a row of the plan");
        let from_row = |i: usize| match self.method {
            Method::Shapley => index & (1 << i) != 0,
            Method::Ablation => index != 0 && index != i + 2,
        };
        out.extend((0..self.features).map(|i| if from_row(i) { row[i] } else { baseline[i] }));
    }

    /// Reads the explanation off the model's outputs for the rows `compose` made:
    /// `outputs` holds `rows()` rows of `k` values.
    pub fn attribute(&self, outputs: &[f32], k: usize) -> Explanation {
        assert_eq!(
            outputs.len(),
            self.rows() * k,
            "one output row per model row"
        );
        let at = |row: usize| &outputs[row * k..(row + 1) * k];
        match self.method {
            Method::Shapley => {
                let weights = shapley_weights(self.features);
                let mut attributions = vec![vec![0f64; self.features]; k];
                for mask in 0..self.rows() {
                    for (i, weight) in (0..self.features).map(|i| (i, 1usize << i)) {
                        if mask & weight != 0 {
                            continue;
                        }
                        let coalition = mask.count_ones() as usize;
                        let (without, with) = (at(mask), at(mask | weight));
                        for j in 0..k {
                            let marginal = f64::from(with[j]) - f64::from(without[j]);
                            attributions[j][i] += weights[coalition] * marginal;
                        }
                    }
                }
                Explanation {
                    prediction: at(self.rows() - 1).to_vec(),
                    baseline_prediction: at(0).to_vec(),
                    attributions: narrowed(attributions),
                }
            }
            Method::Ablation => {
                let prediction = at(1);
                let attributions = (0..k)
                    .map(|j| {
                        (0..self.features)
                            .map(|i| prediction[j] - at(2 + i)[j])
                            .collect()
                    })
                    .collect();
                Explanation {
                    prediction: prediction.to_vec(),
                    baseline_prediction: at(0).to_vec(),
                    attributions,
                }
            }
        }
    }
}

/// The weight of a marginal effect for a coalition of `s` other features, out of
/// `features`: s! (features − s − 1)! / features!, for every `s` below `features`.
fn shapley_weights(features: usize) -> Vec<f64> {
    let factorial = |n: usize| (1..=n).map(|i| i as f64).product::<f64>();
    let all = factorial(features);
    (0..features)
        .map(|s| factorial(s) * factorial(features - s - 1) / all)
        .collect()
}

fn narrowed(values: Vec<Vec<f64>>) -> Vec<Vec<f32>> {
    values
        .into_iter()
        .map(|row| row.into_iter().map(|value| value as f32).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs `model` (one row in, `k` values out) on every row `plan` composes for `row`.
    fn run(
        plan: &Plan,
        row: &[f32],
        baseline: &[f32],
        model: impl Fn(&[f32]) -> Vec<f32>,
    ) -> Explanation {
        let mut rows = Vec::new();
        plan.compose(row, baseline, &mut rows);
        let outputs: Vec<f32> = rows.chunks(row.len()).flat_map(&model).collect();
        let k = outputs.len() / plan.rows();
        plan.attribute(&outputs, k)
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-3 * (1.0 + a.abs().max(b.abs()))
    }

    fn values(features: usize) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(-10f32..10.0, features)
    }

    /// A model known in closed form: `k` outputs, each a weighted sum of the features.
    fn linear(weights: &[Vec<f32>], bias: &[f32]) -> impl Fn(&[f32]) -> Vec<f32> {
        move |row: &[f32]| {
            weights
                .iter()
                .zip(bias)
                .map(|(w, b)| b + w.iter().zip(row).map(|(w, x)| w * x).sum::<f32>())
                .collect()
        }
    }

    proptest! {
        /// Shapley values of any function add up to its value at the row less its value at
        /// the baseline: a random table of outputs stands for every model.
        #[test]
        fn shapley_attributions_add_up_to_the_prediction_less_the_baseline(
            features in 1usize..=SHAPLEY_FEATURES_MAX,
            k in 1usize..4,
            seed in any::<u64>(),
        ) {
            let plan = Plan::new(Method::Shapley, features).unwrap();
            let mut state = seed | 1;
            let outputs: Vec<f32> = (0..plan.rows() * k)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 2_000) as f32 / 100.0 - 10.0
                })
                .collect();
            let explanation = plan.attribute(&outputs, k);
            for j in 0..k {
                let total: f32 = explanation.attributions[j].iter().sum();
                let change = explanation.prediction[j] - explanation.baseline_prediction[j];
                prop_assert!(close(total, change), "output {j}: {total} against {change}");
            }
        }

        /// For a linear model both methods give each feature its weight times how far it
        /// is from the baseline.
        #[test]
        fn both_methods_give_a_linear_model_its_weight_times_the_distance_from_the_baseline(
            (row, baseline, weights) in (1usize..=6).prop_flat_map(|features| (
                values(features),
                values(features),
                prop::collection::vec(values(features), 1..3),
            )),
        ) {
            let bias: Vec<f32> = (0..weights.len()).map(|j| j as f32).collect();
            for method in [Method::Shapley, Method::Ablation] {
                let plan = Plan::new(method, row.len()).unwrap();
                let explanation = run(&plan, &row, &baseline, linear(&weights, &bias));
                for (j, w) in weights.iter().enumerate() {
                    for i in 0..row.len() {
                        let expected = w[i] * (row[i] - baseline[i]);
                        let got = explanation.attributions[j][i];
                        prop_assert!(close(got, expected), "{method:?} output {j} feature {i}: {got} against {expected}");
                    }
                }
            }
        }

        /// A feature the model never reads gets nothing, however the others interact.
        #[test]
        fn a_feature_the_model_ignores_gets_no_attribution(
            (row, baseline) in (2usize..=6).prop_flat_map(|features| (values(features), values(features))),
            ignored in 0usize..6,
        ) {
            let ignored = ignored % row.len();
            let model = |x: &[f32]| {
                let product: f32 = x.iter().enumerate().filter(|(i, _)| *i != ignored).map(|(_, v)| v.tanh()).product();
                vec![product, x.iter().enumerate().filter(|(i, _)| *i != ignored).map(|(_, v)| v * v).sum()]
            };
            for method in [Method::Shapley, Method::Ablation] {
                let plan = Plan::new(method, row.len()).unwrap();
                let explanation = run(&plan, &row, &baseline, model);
                for attributions in &explanation.attributions {
                    prop_assert_eq!(attributions[ignored], 0.0);
                }
            }
        }
    }

    #[test]
    fn the_composed_rows_take_each_feature_from_the_row_or_the_baseline() {
        let (row, baseline) = ([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]);
        let mut rows = Vec::new();
        Plan::new(Method::Shapley, 3)
            .unwrap()
            .compose(&row, &baseline, &mut rows);
        let rows: Vec<&[f32]> = rows.chunks(3).collect();
        assert_eq!(rows.len(), 8);
        assert_eq!(rows[0], baseline);
        assert_eq!(rows[0b101], [1.0, -2.0, 3.0]);
        assert_eq!(rows[7], row);

        let mut rows = Vec::new();
        Plan::new(Method::Ablation, 3)
            .unwrap()
            .compose(&row, &baseline, &mut rows);
        let rows: Vec<&[f32]> = rows.chunks(3).collect();
        assert_eq!(
            rows,
            [
                &baseline[..],
                &row,
                &[-1.0, 2.0, 3.0],
                &[1.0, -2.0, 3.0],
                &[1.0, 2.0, -3.0]
            ]
        );
    }

    #[test]
    fn shapley_past_its_feature_limit_is_refused_naming_ablation() {
        let error = Plan::new(Method::Shapley, SHAPLEY_FEATURES_MAX + 1).unwrap_err();
        assert!(error.contains("ablation"), "{error}");
        assert!(Plan::new(Method::Ablation, 784).is_ok());
        assert!(Plan::new(Method::Ablation, 0).is_err());
    }

    /// Two features that only matter together (an AND) share its effect equally under
    /// Shapley; ablation gives each the whole effect, so its attributions do not add up.
    #[test]
    fn interacting_features_share_the_effect_under_shapley_not_under_ablation() {
        let and = |x: &[f32]| vec![x[0] * x[1]];
        let (row, baseline) = ([1.0, 1.0], [0.0, 0.0]);
        let shapley = run(
            &Plan::new(Method::Shapley, 2).unwrap(),
            &row,
            &baseline,
            and,
        );
        assert_eq!(shapley.attributions, [[0.5, 0.5]]);
        let ablation = run(
            &Plan::new(Method::Ablation, 2).unwrap(),
            &row,
            &baseline,
            and,
        );
        assert_eq!(ablation.attributions, [[1.0, 1.0]]);
        assert_eq!(
            (ablation.prediction[0], ablation.baseline_prediction[0]),
            (1.0, 0.0)
        );
    }
}
