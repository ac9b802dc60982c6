//! Tests of the pipeline's steps: blocked dequantization against hand-computed values,
//! ONNX Runtime's int8 weights requantized, weight transposes folded, cache names parsed, and
//! the fixtures' tied LM heads folded at load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::pb::{self, tensor_proto::DataType};
use tract_onnx::prelude::*;

use super::bind::cache_slot;
use super::dequantize::fold_blocked;
use super::external::{tensor_floats, ExternalData};
use super::int8::requantize_matmul_integer;
use super::plan::{make_plan, per_step_constants, to_typed};
use super::rewrite::fold_weight_transposes;
use crate::attention::RingAttention;
use crate::config::Config;
use crate::quant::{Kernel, Scheme, ThreadPool};

fn no_external() -> ExternalData {
    ExternalData {
        root: None,
        files: HashMap::new(),
    }
}

fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|&d| Dimension {
            value: Some(Value::DimValue(d)),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn int_attribute(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn initializer(name: &str, dims: &[usize], data_type: DataType, raw: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: data_type as i32,
        raw_data: raw,
        ..Default::default()
    }
}

/// Blocked int8 weights of a linear layer: q (n, k), scale and zero point (n, ceil(k/32)).
struct Blocked {
    n: usize,
    k: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    zero: Option<Vec<i8>>,
}

impl Blocked {
    /// Values chosen so every product and sum is exact in f32: small integers times
    /// powers of two.
    fn new(n: usize, k: usize, with_zero: bool) -> Blocked {
        let blocks = k.div_ceil(32);
        let q = (0..n * k).map(|i| ((i * 7 + 3) % 31) as i8 - 15).collect();
        let scale = (0..n * blocks)
            .map(|i| [0.5, 0.25, 0.125, 1.0][i % 4])
            .collect();
        let zero = with_zero.then(|| (0..n * blocks).map(|i| (i % 5) as i8 - 2).collect());
        Blocked {
            n,
            k,
            q,
            scale,
            zero,
        }
    }

    fn dequantized(&self, row: usize, col: usize) -> f32 {
        let b = row * self.k.div_ceil(32) + col / 32;
        let z = self.zero.as_ref().map_or(0, |z| z[b]);
        (f32::from(self.q[row * self.k + col]) - f32::from(z)) * self.scale[b]
    }

    /// x (1, k) → DequantizeLinear(block_size 32) → Transpose → MatMul → y (1, n).
    fn linear_model(&self) -> pb::ModelProto {
        let blocks = self.k.div_ceil(32);
        let mut initializers = vec![
            initializer(
                "w_q",
                &[self.n, self.k],
                DataType::Int8,
                self.q.iter().map(|&v| v as u8).collect(),
            ),
            initializer(
                "w_scale",
                &[self.n, blocks],
                DataType::Float,
                self.scale.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ];
        let mut dq_inputs = vec!["w_q".to_string(), "w_scale".to_string()];
        if let Some(zero) = &self.zero {
            initializers.push(initializer(
                "w_zero",
                &[self.n, blocks],
                DataType::Int8,
                zero.iter().map(|&v| v as u8).collect(),
            ));
            dq_inputs.push("w_zero".into());
        }
        let node = |op: &str, inputs: Vec<String>, output: &str, attribute| pb::NodeProto {
            op_type: op.into(),
            name: format!("{op}_0"),
            input: inputs,
            output: vec![output.into()],
            attribute,
            ..Default::default()
        };
        let perm = pb::AttributeProto {
            name: "perm".into(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: vec![1, 0],
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 10,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 21,
            }],
            graph: Some(pb::GraphProto {
                node: vec![
                    node(
                        "DequantizeLinear",
                        dq_inputs,
                        "w",
                        vec![int_attribute("axis", 1), int_attribute("block_size", 32)],
                    ),
                    node("Transpose", vec!["w".into()], "w_t", vec![perm]),
                    node("MatMul", vec!["x".into(), "w_t".into()], "y", vec![]),
                ],
                initializer: initializers,
                input: vec![value_info("x", &[1, self.k as i64])],
                output: vec![value_info("y", &[1, self.n as i64])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

fn run_linear(blocked: &Blocked) -> (Vec<f32>, Vec<f32>) {
    let mut proto = blocked.linear_model();
    let graph = proto.graph.as_mut().unwrap();
    assert_eq!(fold_blocked(graph, &no_external()).unwrap(), 1);
    assert!(graph.node.iter().all(|n| n.op_type != "DequantizeLinear"));
    let names: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["w"], "the int8 weights and scales are dropped");

    let model = to_typed(&proto, Path::new("."), no_external()).unwrap();
    let plan = make_plan(model.into_optimized().unwrap()).unwrap();
    let x: Vec<f32> = (0..blocked.k).map(|i| (i % 9) as f32 - 4.0).collect(); // (1, k)
    let out = plan
        .run(tvec![Tensor::from_shape(&[1, blocked.k], &x)
            .unwrap()
            .into()])
        .unwrap();
    let got = out[0]
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap()
        .to_vec(); // (1, n)
    let want = (0..blocked.n)
        .map(|row| {
            (0..blocked.k)
                .map(|col| x[col] * blocked.dequantized(row, col))
                .sum()
        })
        .collect();
    (got, want)
}

#[test]
fn blocked_dequantize_linear_k64_matches_hand_computed() {
    let (got, want) = run_linear(&Blocked::new(5, 64, true));
    assert_eq!(got, want);
}

#[test]
fn blocked_dequantize_linear_k80_ragged_last_block() {
    let (got, want) = run_linear(&Blocked::new(5, 80, true));
    assert_eq!(got, want);
}

#[test]
fn blocked_dequantize_without_zero_point() {
    let (got, want) = run_linear(&Blocked::new(3, 80, false));
    assert_eq!(got, want);
}

#[test]
fn blocked_dequantize_values_follow_onnx_semantics() {
    let blocked = Blocked::new(2, 80, true);
    let mut proto = blocked.linear_model();
    let graph = proto.graph.as_mut().unwrap();
    fold_blocked(graph, &no_external()).unwrap();
    let w = tensor_floats(&graph.initializer[0], &no_external()).unwrap(); // (n, k)
    assert_eq!(graph.initializer[0].dims, [2, 80]);
    for row in 0..2 {
        for col in 0..80 {
            assert_eq!(
                w[row * 80 + col],
                blocked.dequantized(row, col),
                "({row}, {col})"
            );
        }
    }
    // Column 79 sits in the third, ragged block (64..80).
    let b = 2 * 3 - 1;
    let zero = blocked.zero.as_ref().unwrap()[b];
    assert_eq!(
        w[79 + 80],
        (f32::from(blocked.q[80 + 79]) - f32::from(zero)) * blocked.scale[b]
    );
}

#[test]
fn blocked_dequantize_rejects_a_wrong_scale_shape() {
    let mut blocked = Blocked::new(2, 64, false);
    blocked.k = 80; // scales for 2 blocks, weights needing 3
    blocked.q.resize(2 * 80, 0);
    blocked.scale.truncate(2 * 2);
    let mut proto = blocked.linear_model();
    let graph = proto.graph.as_mut().unwrap();
    for t in &mut graph.initializer {
        if t.name == "w_scale" {
            t.dims = vec![2, 2];
        }
    }
    let err = format!("{:#}", fold_blocked(graph, &no_external()).unwrap_err());
    assert!(
        err.contains("x_scale has shape [2, 2], expected [2, 3]"),
        "{err}"
    );
}

/// ONNX Runtime's per-tensor u8 weights with a zero point, W (k, n) = (q - 128) * 0.25,
/// become our (n, k) blocks: every value within half a quantization step of W.
#[test]
fn matmul_integer_weights_requantize_per_tensor_u8() {
    let (k, n) = (40, 3);
    let q: Vec<u8> = (0..k * n).map(|i| (i * 37 % 200 + 28) as u8).collect(); // (k, n)
    let w = initializer("w", &[k, n], DataType::Uint8, q.clone());
    let scale = initializer("s", &[], DataType::Float, 0.25f32.to_le_bytes().to_vec());
    let zero = initializer("z", &[], DataType::Uint8, vec![128]);
    let weights = requantize_matmul_integer("w", &w, &scale, Some(&zero), &no_external()).unwrap();
    let m = weights.matrix().unwrap();
    assert_eq!((m.n(), m.k()), (n, k));
    for c in 0..n {
        for r in 0..k {
            let step = m.scales()[c * m.blocks_per_row() + r / 32];
            let got = f32::from(m.q()[c * k + r]) * step;
            let want = (f32::from(q[r * n + c]) - 128.0) * 0.25;
            assert!(
                (got - want).abs() <= step / 2.0 + 1e-6,
                "W[{r}, {c}]: {got} vs {want}"
            );
        }
    }

    let two = initializer("s2", &[2], DataType::Float, vec![0; 8]);
    let err = requantize_matmul_integer("w", &w, &two, None, &no_external()).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "scale of \"w\" has 2 values for 3 columns"
    );
}

#[test]
fn cache_slots_are_parsed() {
    assert_eq!(
        cache_slot("past_key_values.1.value", "past_key_values.", 2),
        Some((1, true))
    );
    assert_eq!(cache_slot("present.0.key", "present.", 2), Some((0, false)));
    assert_eq!(cache_slot("present.2.key", "present.", 2), None);
    assert_eq!(cache_slot("present.0.query", "present.", 2), None);
}

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// Regression: a tied LM head is `Transpose(embedding)` → `MatMul`; tract once re-packed
/// that matrix on every step. Every all-constant node must be folded at load.
#[test]
fn tied_lm_head_is_folded_at_load() {
    for bundle in [
        "tiny-llama/onnx-f32",
        "tiny-llama/onnx-int8",
        "tiny-gpt2/onnx-f32",
        "tiny-gpt2/onnx-int8",
    ] {
        let dir = fixture(bundle);
        let config = Config::load(&dir).unwrap();
        let pool = Arc::new(ThreadPool::new(1).unwrap());
        let built = super::build(&dir, &config, Scheme::Q8F32, Kernel::best(), &pool).unwrap();
        assert!(config.tie_word_embeddings);
        let stale = per_step_constants(built.plan.model());
        assert_eq!(stale, Vec::<String>::new(), "{bundle}");
    }
}

#[test]
fn transposed_weights_are_folded_into_initializers() {
    let w = pb::TensorProto {
        name: "w".into(),
        dims: vec![2, 3],
        data_type: DataType::Float as i32,
        raw_data: [1f32, 2., 3., 4., 5., 6.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        ..Default::default()
    };
    let transpose = pb::NodeProto {
        input: vec!["w".into()],
        output: vec!["w_t".into()],
        op_type: "Transpose".into(),
        attribute: vec![pb::AttributeProto {
            name: "perm".into(),
            ints: vec![1, 0],
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    let matmul = pb::NodeProto {
        input: vec!["x".into(), "w_t".into()],
        output: vec!["y".into()],
        op_type: "MatMul".into(),
        ..Default::default()
    };
    let mut graph = pb::GraphProto {
        node: vec![transpose, matmul],
        initializer: vec![w],
        ..Default::default()
    };
    fold_weight_transposes(&mut graph);
    assert_eq!(graph.node.len(), 1);
    assert_eq!(
        graph.initializer.len(),
        1,
        "the untransposed copy is dropped"
    );
    let t = &graph.initializer[0];
    assert_eq!(
        (t.name.as_str(), t.dims.as_slice()),
        ("w_t", [3i64, 2].as_slice())
    );
    let v: Vec<f32> = t
        .raw_data
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(v, [1., 4., 2., 5., 3., 6.]);
}

/// One kernel choice reaches every operator of ours: each layer's attention and the int8
/// products run the kernel the model was loaded with, on the one pool.
#[test]
fn the_kernel_choice_reaches_the_attention_and_the_int8_products() {
    let dir = fixture("tiny-llama/onnx-int8");
    let config = Config::load(&dir).unwrap();
    let pool = Arc::new(ThreadPool::new(2).unwrap());
    for kernel in Kernel::available() {
        let built = super::build(&dir, &config, Scheme::Q8F32, kernel, &pool).unwrap();
        let ring: Vec<&RingAttention> = built
            .plan
            .model()
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<RingAttention>())
            .collect();
        assert_eq!(ring.len(), config.num_hidden_layers);
        for op in ring {
            assert_eq!(op.kernel, kernel, "layer {}", op.layer);
            assert!(Arc::ptr_eq(&op.pool, &pool), "layer {}", op.layer);
        }
        assert_eq!(
            built.summary.int8_exec,
            Some(format!("Q8F32/{kernel}/2 threads"))
        );
    }
}
