//! A small ONNX graph writer over `tract_onnx::pb` (prost) types, with weights in an
//! external-data file whose every tensor starts 64-byte aligned (so the runtime can
//! read int8 blocks in place from an mmap with aligned SIMD loads).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

use super::Int8Layout;
use crate::quant::gemm::{tile_q8, GROUP, QUAD};
use crate::quant::BLOCK;

/// Alignment of every tensor in the external-data file.
pub const DATA_ALIGN: u64 = 64;

/// ONNX opset we write: 21 is the first with blocked `DequantizeLinear`.
pub const OPSET: i64 = 21;

/// An element type we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// 32-bit float.
    F32,
    /// 64-bit signed integer.
    I64,
    /// 8-bit signed integer.
    I8,
    /// Boolean.
    Bool,
}

impl Elem {
    fn data_type(self) -> i32 {
        match self {
            Elem::F32 => DataType::Float as i32,
            Elem::I64 => DataType::Int64 as i32,
            Elem::I8 => DataType::Int8 as i32,
            Elem::Bool => DataType::Bool as i32,
        }
    }
}

/// One dimension of a graph input/output: fixed or symbolic.
#[derive(Clone, Debug)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A named symbol such as `sequence_length`.
    Sym(&'static str),
}

/// Writes weights sequentially into the external-data file, each 64-byte aligned.
pub struct ExternalData {
    file_name: String,
    out: BufWriter<File>,
    path: PathBuf,
    offset: u64,
}

impl ExternalData {
    /// Creates (truncates) `dir/file_name`.
    pub fn create(dir: &Path, file_name: &str) -> Result<ExternalData> {
        let path = dir.join(file_name);
        let file =
            File::create(&path).with_context(|| format!("creating \"{}\"", path.display()))?;
        Ok(ExternalData {
            file_name: file_name.to_string(),
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            offset: 0,
        })
    }

    /// Appends `bytes` at the next aligned offset; returns the tensor's external reference.
    fn append(&mut self, bytes: &[u8]) -> Result<Vec<pb::StringStringEntryProto>> {
        let pad = (DATA_ALIGN - self.offset % DATA_ALIGN) % DATA_ALIGN;
        let zeros = [0u8; DATA_ALIGN as usize];
        self.out
            .write_all(&zeros[..pad as usize])
            .and_then(|_| self.out.write_all(bytes))
            .with_context(|| format!("writing \"{}\"", self.path.display()))?;
        let start = self.offset + pad;
        self.offset = start + bytes.len() as u64;
        let entry = |k: &str, v: String| pb::StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        Ok(vec![
            entry("location", self.file_name.clone()),
            entry("offset", start.to_string()),
            entry("length", bytes.len().to_string()),
        ])
    }

    /// Flushes the file to disk.
    pub fn finish(mut self) -> Result<u64> {
        self.out
            .flush()
            .with_context(|| format!("writing \"{}\"", self.path.display()))?;
        Ok(self.offset)
    }
}

/// Builds one ONNX graph: nodes, initializers, inputs and outputs.
pub struct GraphBuilder {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    data: ExternalData,
    next_id: usize,
    int8_layout: Int8Layout,
}

/// An attribute value for [`GraphBuilder::node`].
pub enum Attr {
    /// An integer.
    Int(i64),
    /// A list of integers.
    Ints(Vec<i64>),
    /// A float.
    Float(f32),
}

impl GraphBuilder {
    /// A new graph whose large tensors go to `data`.
    pub fn new(data: ExternalData) -> GraphBuilder {
        GraphBuilder {
            nodes: vec![],
            initializers: vec![],
            inputs: vec![],
            outputs: vec![],
            data,
            next_id: 0,
            int8_layout: Int8Layout::default(),
        }
    }

    /// Sets how [`GraphBuilder::dequantized_q8`] stores int8 matrices.
    pub fn set_int8_layout(&mut self, layout: Int8Layout) {
        self.int8_layout = layout;
    }

    /// Stores an (n, k) matrix of int8 blocks (`q` (n, k) two's-complement bytes, `scales`
    /// (n, ceil(k / 32))) under `name` in this graph's int8 layout; returns the value of its
    /// `DequantizeLinear(axis = 1, block_size = 32)`, the (n, k) f32 matrix, in either.
    ///
    /// Row-major: initializers `{name}.q8` (n, k) and `{name}.scale` (n, nb). Tiled:
    /// `{name}.q8` (G, nb, 8, 16, 4) and `{name}.scale` (G, nb, 16) as `quant::gemm` lays
    /// them out, each followed by the `Transpose`, `Reshape` and `Slice` that give the
    /// row-major tensor back (standard ops, so any ONNX runtime reads the bundle).
    pub fn dequantized_q8(
        &mut self,
        name: &str,
        [n, k]: [usize; 2],
        q: &[u8],
        scales: &[f32],
    ) -> Result<String> {
        let nb = k.div_ceil(BLOCK) as i64;
        let (q_name, s_name) = (format!("{name}.q8"), format!("{name}.scale"));
        let (q, s) = match self.int8_layout {
            Int8Layout::Rows => (
                self.weight(&q_name, Elem::I8, &[n as i64, k as i64], q)?,
                self.weight_f32(&s_name, &[n as i64, nb], scales)?,
            ),
            Int8Layout::Tiled => {
                let signed: Vec<i8> = q.iter().map(|&v| v as i8).collect();
                let (tq, ts) = tile_q8(&signed, scales, n, k);
                let groups = n.div_ceil(GROUP) as i64;
                let (g16, quads) = (GROUP as i64, (BLOCK / QUAD) as i64);
                let bytes: Vec<u8> = tq.iter().map(|&v| v as u8).collect();
                let dims = [groups, nb, quads, g16, QUAD as i64];
                let tq = self.weight(&q_name, Elem::I8, &dims, &bytes)?;
                let ts = self.weight_f32(&s_name, &[groups, nb, g16], &ts)?;
                let rows = g16 * groups;
                let q = self.untiled(
                    &tq,
                    &[0, 3, 1, 2, 4],
                    [rows, BLOCK as i64 * nb],
                    [n as i64, k as i64],
                );
                let s = self.untiled(&ts, &[0, 2, 1], [rows, nb], [n as i64, nb]);
                (q, s)
            }
        };
        let attrs = vec![
            ("axis", Attr::Int(1)),
            ("block_size", Attr::Int(BLOCK as i64)),
        ];
        Ok(self.node("DequantizeLinear", &[&q, &s], attrs))
    }

    /// `Slice(Reshape(Transpose(value, perm), reshaped), [0, 0], ends)`.
    fn untiled(&mut self, value: &str, perm: &[i64], reshaped: [i64; 2], ends: [i64; 2]) -> String {
        let t = self.node(
            "Transpose",
            &[value],
            vec![("perm", Attr::Ints(perm.to_vec()))],
        );
        let shape = self.const_i64("shape", &[2], &reshaped);
        let r = self.node("Reshape", &[&t, &shape], vec![]);
        let starts = self.const_i64("starts", &[2], &[0, 0]);
        let ends = self.const_i64("ends", &[2], &ends);
        self.node("Slice", &[&r, &starts, &ends], vec![])
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next_id += 1;
        format!("{hint}_{}", self.next_id)
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem: Elem, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        name.to_string()
    }

    /// Declares `value` as the graph output `name` (through an Identity when renamed).
    pub fn output(&mut self, value: &str, name: &str, elem: Elem, dims: &[Dim]) {
        if value != name {
            self.nodes.push(pb::NodeProto {
                input: vec![value.into()],
                output: vec![name.into()],
                name: format!("{name}_identity"),
                op_type: "Identity".into(),
                ..Default::default()
            });
        }
        self.outputs.push(value_info(name, elem, dims));
    }

    /// Adds a node with one output; returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.node_named(op, inputs, attrs, &out);
        out
    }

    /// Adds a node whose single output has a chosen name.
    pub fn node_named(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, out: &str) {
        let attribute = attrs
            .into_iter()
            .map(|(name, a)| {
                use pb::attribute_proto::AttributeType as T;
                let mut p = pb::AttributeProto {
                    name: name.into(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(i) => {
                        p.r#type = T::Int as i32;
                        p.i = i;
                    }
                    Attr::Ints(v) => {
                        p.r#type = T::Ints as i32;
                        p.ints = v;
                    }
                    Attr::Float(f) => {
                        p.r#type = T::Float as i32;
                        p.f = f;
                    }
                }
                p
            })
            .collect();
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            name: format!("{out}_node"),
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
    }

    /// A small constant stored inside model.onnx.
    pub fn const_f32(&mut self, hint: &str, dims: &[i64], values: &[f32]) -> String {
        let name = self.fresh(hint);
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(tensor(&name, Elem::F32, dims, raw));
        name
    }

    /// A small i64 constant stored inside model.onnx.
    pub fn const_i64(&mut self, hint: &str, dims: &[i64], values: &[i64]) -> String {
        let name = self.fresh(hint);
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(tensor(&name, Elem::I64, dims, raw));
        name
    }

    /// A weight stored in the external-data file under a stable name.
    pub fn weight(&mut self, name: &str, elem: Elem, dims: &[i64], bytes: &[u8]) -> Result<String> {
        let mut t = tensor(name, elem, dims, vec![]);
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        t.external_data = self.data.append(bytes)?;
        self.initializers.push(t);
        Ok(name.to_string())
    }

    /// A weight of f32 values in the external-data file.
    pub fn weight_f32(&mut self, name: &str, dims: &[i64], values: &[f32]) -> Result<String> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.weight(name, Elem::F32, dims, &bytes)
    }

    /// Serialises the model to `path`; returns the external-data size in bytes.
    pub fn finish(self, path: &Path, graph_name: &str) -> Result<u64> {
        let data_bytes = self.data.finish()?;
        let model = pb::ModelProto {
            ir_version: 10,
            producer_name: "edgelm".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            graph: Some(pb::GraphProto {
                node: self.nodes,
                name: graph_name.into(),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        };
        std::fs::write(path, model.encode_to_vec())
            .with_context(|| format!("writing \"{}\"", path.display()))?;
        Ok(data_bytes)
    }
}

fn tensor(name: &str, elem: Elem, dims: &[i64], raw: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto {
        dims: dims.to_vec(),
        data_type: elem.data_type(),
        name: name.into(),
        raw_data: raw,
        ..Default::default()
    }
}

/// A graph input or output of `elem` values shaped `dims`.
pub(crate) fn value_info(name: &str, elem: Elem, dims: &[Dim]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => Value::DimValue(*v),
                Dim::Sym(s) => Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem.data_type(),
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
