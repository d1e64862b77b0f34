// perceptcore's latent model of an observer group's predictions.
//
//   y[m] ~ Bernoulli(inv_logit(b[g] + mu[n] + gamma[s, g] + nu[r, g])),  g = group[n]
//
// for prediction m by observer (reader or seed) r on case n at severity s.
// With class_offset, a positive case's effect has prior mean delta[g] (a negative one's 0): the
// case effects of the two classes are two populations, and one N(0, sd) prior for both pulls the
// positives towards the negatives, shrinking every measure of class separation. Without it the
// model is the published one.
// Binary calls use the Bernoulli likelihood; probabilities z in [0, 1] use the
// expected ("soft") Bernoulli log-likelihood z log(theta) + (1 - z) log(1 - theta).
// gamma[1, ] is the unperturbed reference and fixed at 0. Under the `random_walk`
// parameterisation the prior is on the increments between consecutive severities
// (the published code); under `independent` it is on each level (the paper text).
// Every density is written with target += *_lpdf so that the log density keeps its
// normalising constants: the embedded backend computes the same number.
data {
  int<lower=1> N;                       // cases
  int<lower=1> R;                       // observers in the group
  int<lower=2> S;                       // severities, the first is the reference
  int<lower=1> G;                       // subgroups
  int<lower=0> M;                       // predictions
  array[N] int<lower=1, upper=G> group;
  array[M] int<lower=1, upper=R> reader;
  array[M] int<lower=1, upper=S> severity;
  array[M] int<lower=1, upper=N> case_id;
  int<lower=0, upper=1> soft;           // 1: z holds probabilities; 0: y holds 0/1 calls
  array[soft ? 0 : M] int<lower=0, upper=1> y;
  vector<lower=0, upper=1>[soft ? M : 0] z;
  int<lower=0, upper=1> random_walk;    // 1: random_walk, 0: independent
  real<lower=0> prior_sd_b;
  real<lower=0> prior_sd_mu;
  real<lower=0> prior_sd_gamma;
  real<lower=0> prior_sd_nu;
  int<lower=0, upper=1> class_offset;   // 1: the case effects' prior mean is delta[g] * positive[n]
  array[N] int<lower=0, upper=1> positive;
  real<lower=0> prior_sd_delta;
}
transformed data {
  // Column-major positions into gamma (S x G) and nu (R x G), so that the
  // likelihood is one vectorised statement.
  array[M] int gamma_pos;
  array[M] int nu_pos;
  array[M] int obs_group;
  for (m in 1:M) {
    obs_group[m] = group[case_id[m]];
    gamma_pos[m] = (obs_group[m] - 1) * S + severity[m];
    nu_pos[m] = (obs_group[m] - 1) * R + reader[m];
  }
}
parameters {
  vector[G] b;
  vector[N] mu;
  matrix[S - 1, G] gamma_free;          // increments (random_walk) or levels (independent)
  matrix[R, G] nu;
  vector[class_offset ? G : 0] delta;
}
transformed parameters {
  matrix[S, G] gamma;
  gamma[1] = rep_row_vector(0, G);
  for (g in 1:G) {
    if (random_walk) {
      gamma[2:S, g] = cumulative_sum(gamma_free[, g]);
    } else {
      gamma[2:S, g] = gamma_free[, g];
    }
  }
}
model {
  vector[M] eta = b[obs_group] + mu[case_id] + to_vector(gamma)[gamma_pos] + to_vector(nu)[nu_pos];
  target += normal_lpdf(b | 0, prior_sd_b);
  if (class_offset) {
    target += normal_lpdf(mu | delta[group] .* to_vector(positive), prior_sd_mu);
    target += normal_lpdf(delta | 0, prior_sd_delta);
  } else {
    target += normal_lpdf(mu | 0, prior_sd_mu);
  }
  target += normal_lpdf(to_vector(gamma_free) | 0, prior_sd_gamma);
  target += normal_lpdf(to_vector(nu) | 0, prior_sd_nu);
  if (soft) {
    target += dot_product(z, log_inv_logit(eta)) + dot_product(1 - z, log1m_inv_logit(eta));
  } else {
    target += bernoulli_logit_lpmf(y | eta);
  }
}
