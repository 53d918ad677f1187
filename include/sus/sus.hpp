// sus — SUS backprop: linear-time, unbiased attention backward for long sequences.
//
//   forward (records W)    attention_forward + DenseWeights / LogSumExp / SusMask   forward.hpp
//   sampler (W -> CSR)     sample_mask, RowSampler, SamplerOptions                  sampler.hpp
//   backward (CSR -> grads) attention_backward_sparse / attention_backward_dense    backward.hpp
//   multi-head batches     multihead_attention_forward / _backward, HeadsView     multihead.hpp
//   plain references       sus::reference::                                         reference.hpp
#pragma once

#include "version.hpp"
#include "error.hpp"
#include "types.hpp"
#include "csr.hpp"
#include "sampler.hpp"
#include "recorders.hpp"
#include "forward.hpp"
#include "sparse.hpp"
#include "backward.hpp"
#include "multihead.hpp"
#include "reference.hpp"
