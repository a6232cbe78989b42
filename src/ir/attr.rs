//! Reading and building node attributes. Attributes stay `AttributeProto`s (lossless); these
//! helpers give typed access and build new ones with their type tag set, as ONNX requires.

use crate::proto::attribute_proto::AttributeType;
use crate::proto::{AttributeProto, NodeProto, TensorProto};

use super::tensor::Tensor;

pub fn get<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

pub fn get_int(node: &NodeProto, name: &str) -> Option<i64> {
    get(node, name).and_then(|a| a.i)
}

pub fn get_float(node: &NodeProto, name: &str) -> Option<f32> {
    get(node, name).and_then(|a| a.f)
}

pub fn get_ints<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [i64]> {
    get(node, name).map(|a| a.ints.as_slice())
}

pub fn get_string(node: &NodeProto, name: &str) -> Option<String> {
    get(node, name)
        .and_then(|a| a.s.as_ref())
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

pub fn get_tensor<'a>(node: &'a NodeProto, name: &str) -> Option<&'a TensorProto> {
    get(node, name).and_then(|a| a.t.as_ref())
}

fn named(name: &str, ty: AttributeType) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(ty as i32),
        ..Default::default()
    }
}

pub fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        i: Some(v),
        ..named(name, AttributeType::Int)
    }
}

pub fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        f: Some(v),
        ..named(name, AttributeType::Float)
    }
}

pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        ints: v.to_vec(),
        ..named(name, AttributeType::Ints)
    }
}

pub fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        s: Some(bytes::Bytes::copy_from_slice(v.as_bytes())),
        ..named(name, AttributeType::String)
    }
}

pub fn tensor(name: &str, t: Tensor) -> AttributeProto {
    AttributeProto {
        t: Some(t.into_proto()),
        ..named(name, AttributeType::Tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_attributes_read_back() {
        let node = NodeProto {
            attribute: vec![
                int("axis", -1),
                ints("perm", &[0, 2, 1]),
                float("epsilon", 1e-5),
            ],
            ..Default::default()
        };
        assert_eq!(get_int(&node, "axis"), Some(-1));
        assert_eq!(get_ints(&node, "perm"), Some(&[0, 2, 1][..]));
        assert_eq!(get_float(&node, "epsilon"), Some(1e-5));
        assert_eq!(get_int(&node, "missing"), None);
        assert_eq!(get(&node, "axis").unwrap().r#type(), AttributeType::Int);
    }
}
