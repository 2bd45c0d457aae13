use super::*;
use crate::api::oip::read_with_serde;
use proptest::prelude::*;

/// Tensors equal down to the bits of every float (`-0.0` is not `0.0` here).
fn same_bits(left: &Request, right: &Request) -> bool {
    let data_bits = |data: &TensorData| match data {
        TensorData::Fp32(values) => values.iter().map(|v| u64::from(v.to_bits())).collect(),
        TensorData::Int64(values) => values.iter().map(|&v| v as u64).collect(),
        TensorData::Bytes(_) => Vec::new(),
    };
    left == right
        && left.inputs.iter().zip(&right.inputs).all(|(l, r)| {
            l.data.datatype() == r.data.datatype() && data_bits(&l.data) == data_bits(&r.data)
        })
}

#[test]
fn the_common_shape_takes_the_fast_path() {
    let body = br#" {"id": "r-1", "inputs": [
        {"name": "features", "shape": [2, 3], "datatype": "FP32",
         "data": [[0.5, -1, 2e-3], [1E2, 0, -0.0]]},
        {"datatype": "INT64", "shape": [2], "name": "ids", "data": [7, -9223372036854775808]}
      ], "outputs": [{"name": "label"}]} "#;
    let request = read(body).expect("the fast path reads it");
    assert_eq!(request.id.as_deref(), Some("r-1"));
    assert_eq!(
        request.outputs,
        [Wanted {
            name: "label".into(),
            binary: false
        }]
    );
    assert_eq!(request.inputs[0].shape, [2, 3]);
    assert_eq!(
        request.inputs[0].data,
        TensorData::Fp32(vec![0.5, -1.0, 0.002, 100.0, 0.0, -0.0])
    );
    assert_eq!(request.inputs[1].data, TensorData::Int64(vec![7, i64::MIN]));
    let slow = read_with_serde(body).unwrap();
    assert!(same_bits(&request, &slow));

    // serde_json's own maps write keys in alphabetical order: `data` before `datatype`.
    let sorted = serde_json::json!({"inputs": [{"name": "x", "shape": [1, 2],
        "datatype": "FP32", "data": [0.25f32, 1.5f32]}]})
    .to_string();
    assert!(
        sorted.contains(r#""data":[0.25,1.5],"datatype""#),
        "{sorted}"
    );
    let request = read(sorted.as_bytes()).expect("the fast path reads it");
    assert_eq!(request.inputs[0].data, TensorData::Fp32(vec![0.25, 1.5]));
}

#[test]
fn a_guessed_capacity_holds_at_most_twice_the_elements_it_read() {
    // `data` before `shape`: nothing says how many numbers come, so room is guessed
    // from the bytes left, short numbers outgrow it, and a long tail of other keys
    // leaves most of it unused.
    let short: Vec<String> = (0..500).map(|i| (i % 10).to_string()).collect();
    let padding = "x".repeat(64 * 1024);
    for (numbers, count, tail) in [
        (short.join(","), 500, ""),
        ("0.5, 1.5".to_string(), 2, &padding[..]),
    ] {
        let body = format!(
            r#"{{"inputs": [{{"data": [{numbers}], "datatype": "FP32", "name": "x",
                "shape": [{count}]}}], "id": "{tail}"}}"#
        );
        let request = read(body.as_bytes()).expect("the fast path reads it");
        let TensorData::Fp32(values) = &request.inputs[0].data else {
            panic!("FP32 data");
        };
        assert!(
            values.capacity() <= 2 * values.len(),
            "{}",
            values.capacity()
        );
        let slow = read_with_serde(body.as_bytes()).unwrap();
        assert!(same_bits(&request, &slow));
    }
}

#[test]
fn what_the_fast_path_does_not_know_is_left_to_serde() {
    let bodies: [&[u8]; 12] = [
        br#"{"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}"#,
        br#"{"inputs": [{"name": "x", "shape": [1], "data": [1], "datatype": "FP16"}]}"#,
        br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1],
            "parameters": {}}]}"#,
        br#"{"id": null, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}"#,
        br#"{"inputs": [{"name": "x\n", "shape": [1], "datatype": "FP32", "data": [1]}]}"#,
        br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e400]}]}"#,
        br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [18446744073709551615]}]}"#,
        br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1.5]}]}"#,
        br#"{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}"#,
        br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [01]}]}"#,
        br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]} x"#,
        br#"{"inputs": [{"name": "x", "name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]}"#,
    ];
    for body in bodies {
        assert!(
            read(body).is_none(),
            "{} took the fast path",
            String::from_utf8_lossy(body)
        );
    }
    // serde still reads what is valid, and words what is not.
    assert!(read_with_serde(bodies[0]).is_ok());
    let refused = read_with_serde(bodies[1]).unwrap_err();
    assert!(refused.contains("FP16"), "{refused}");
    let refused = read_with_serde(bodies[7]).unwrap_err();
    assert!(refused.contains("expected an integer"), "{refused}");
    let refused = read_with_serde(bodies[9]).unwrap_err();
    assert!(refused.contains("malformed infer request"), "{refused}");
}

#[test]
fn a_number_past_fp32s_range_is_refused_naming_the_input_and_element() {
    // `datatype` before `data`, and after it (read as FP32 before the type is known).
    let bodies = [
        r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1e39,2,3,4]}]}"#,
        r#"{"inputs":[{"data":[[1,2],[3,-4e38]],"datatype":"FP32","name":"features","shape":[2,2]}]}"#,
        r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,3,3.5e38]}]}"#,
    ];
    for (body, element) in bodies.iter().zip(["element 0", "element 3", "element 3"]) {
        assert!(read(body.as_bytes()).is_none(), "left to serde: {body}");
        let refused = crate::api::oip::read_request(body.as_bytes(), None).unwrap_err();
        assert!(
            refused.contains("input \"features\"") && refused.contains(element),
            "{refused}"
        );
    }
}

/// A JSON number as clients write them: integers, decimals, exponents, the shortest
/// forms of `f32` and `f64`, and long mantissas past what a `u64` holds.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f32>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| format!("{v}")),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| format!("{v:e}")),
        (-1.0e6f64..1.0e6).prop_map(|v| format!("{v}")),
        any::<i64>().prop_map(|v| v.to_string()),
        halfway_between_f32s(),
        any::<u64>().prop_map(|v| v.to_string()),
        (
            proptest::bool::ANY,
            "(0|[1-9][0-9]{0,21})",
            proptest::option::of("[0-9]{1,24}"),
            proptest::option::of(("[eE]", "[+-]?", "[0-9]{1,3}")),
        )
            .prop_map(|(negative, integer, fraction, exponent)| {
                let mut text = String::new();
                if negative {
                    text.push('-');
                }
                text.push_str(&integer);
                if let Some(fraction) = fraction {
                    text.push('.');
                    text.push_str(&fraction);
                }
                if let Some((e, sign, digits)) = exponent {
                    text.push_str(&format!("{e}{sign}{digits}"));
                }
                text
            }),
    ]
}

/// A 17-digit decimal within a few `f64` ulps of a point halfway between two neighbouring
/// `f32`s: where rounding to `f64` first, then to `f32`, is hardest to get right.
fn halfway_between_f32s() -> impl Strategy<Value = String> {
    // Magnitudes from 1e-5 to 1e6, where the fast path does the arithmetic itself.
    let (smallest, largest) = (1e-5f32.to_bits(), 1e6f32.to_bits());
    (smallest..largest, -4i64..=4, proptest::bool::ANY).prop_map(|(bits, ulps, negative)| {
        let (low, high) = (f32::from_bits(bits), f32::from_bits(bits + 1));
        let halfway = (f64::from(low) + f64::from(high)) / 2.0;
        let near = f64::from_bits(halfway.to_bits().wrapping_add_signed(ulps));
        let text = format!("{near:.16e}");
        if negative { format!("-{text}") } else { text }
    })
}

fn space() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", " ", "\n  ", "\t", "\r\n"])
}

/// A well-formed infer request body: one or two inputs, numbers in every form, nested or
/// flat, keys in any order, white space anywhere JSON allows it.
fn request_body() -> impl Strategy<Value = String> {
    let input = (
        prop::sample::select(vec!["FP32", "INT64"]),
        prop::collection::vec(number_text(), 0..12),
        proptest::bool::ANY,
        space(),
        proptest::bool::ANY,
        proptest::bool::ANY,
    )
        .prop_map(
            |(datatype, numbers, nested, space, shape_first, datatype_first)| {
                // Nested data is nested as its shape: two rows of half the numbers.
                let nested = nested && numbers.len() >= 2 && numbers.len() % 2 == 0;
                let (data, dimensions) = if nested {
                    let (left, right) = numbers.split_at(numbers.len() / 2);
                    let data = format!(
                        "[[{}],{space}[{}]]",
                        left.join(","),
                        right.join(&format!(",{space}"))
                    );
                    (data, format!("2, {}", left.len()))
                } else {
                    let data = format!("[{}]", numbers.join(&format!("{space},")));
                    (data, numbers.len().to_string())
                };
                let (name, shape) = (
                    "\"name\": \"x\"",
                    format!("\"shape\":{space}[{dimensions}]"),
                );
                let head = if shape_first {
                    format!("{shape}, {name}")
                } else {
                    format!("{name},{space}{shape}")
                };
                let datatype = format!("\"datatype\": \"{datatype}\"");
                let data = format!("\"data\":{space}{data}");
                let (first, second) = if datatype_first {
                    (datatype, data)
                } else {
                    (data, datatype)
                };
                format!("{{{head}, {first},{space}{second}{space}}}")
            },
        );
    (
        prop::collection::vec(input, 1..3),
        proptest::option::of("[a-z0-9-]{0,8}"),
        space(),
        proptest::bool::ANY,
    )
        .prop_map(|(inputs, id, space, outputs)| {
            let mut fields = vec![format!("\"inputs\":{space}[{}]", inputs.join(", "))];
            if let Some(id) = id {
                fields.insert(0, format!("\"id\": \"{id}\""));
            }
            if outputs {
                fields.push("\"outputs\": [{\"name\": \"y\"}]".into());
            }
            format!("{space}{{{}}}{space}", fields.join(&format!(",{space}")))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// What the fast path reads, serde reads to the same tensors, bit for bit; and a
    /// well-formed request that serde reads without error takes the fast path unless it
    /// holds an integer too long for the fast path's rule.
    #[test]
    fn the_fast_path_agrees_with_serde(body in request_body()) {
        let fast = read(body.as_bytes());
        let slow = read_with_serde(body.as_bytes());
        if let Some(fast) = &fast {
            let slow = slow.as_ref().expect("serde reads what the fast path read");
            prop_assert!(same_bits(fast, slow), "fast {fast:?} serde {slow:?}");
        } else if slow.is_ok() {
            prop_assert!(
                body.split(|c: char| !c.is_ascii_digit()).any(|digits| digits.len() > 19),
                "a request serde reads was left to serde: {body}"
            );
        }
    }

    /// A damaged body — a byte changed or the end cut off — is either refused by the fast
    /// path or read exactly as serde reads it.
    #[test]
    fn a_damaged_body_is_never_misread(
        body in request_body(),
        position in any::<prop::sample::Index>(),
        byte in prop::sample::select(b"[]{},:\"-.eE0123456789 \\xa".to_vec()),
        cut in proptest::bool::ANY,
    ) {
        let mut bytes = body.into_bytes();
        let at = position.index(bytes.len());
        if cut {
            bytes.truncate(at);
        } else {
            bytes[at] = byte;
        }
        if let Some(fast) = read(&bytes) {
            let slow = read_with_serde(&bytes);
            prop_assert!(
                slow.as_ref().is_ok_and(|slow| same_bits(&fast, slow)),
                "fast {fast:?} serde {slow:?} on {}", String::from_utf8_lossy(&bytes)
            );
        }
    }

    /// A float token reads as serde's path reads it: the correctly rounded `f64` of its
    /// text, rounded to `f32`. Tokens next to a point halfway between two `f32`s are
    /// generated on purpose: there the fast path must notice it cannot tell.
    #[test]
    fn float_tokens_read_as_their_f64_rounded_to_f32(text in number_text()) {
        prop_assume!(text.contains(['.', 'e', 'E']));
        let mut cursor = Cursor { bytes: text.as_bytes(), at: 0 };
        let expected = text.parse::<f64>().unwrap();
        match cursor.number() {
            Some(Number::Float(value)) => {
                prop_assert_eq!(value.to_bits(), (expected as f32).to_bits(), "{}", text);
                prop_assert_eq!(cursor.at, text.len());
            }
            None => prop_assert!(!expected.is_finite(), "{} refused", text),
            Some(other) => prop_assert!(false, "{} read as {:?}", text, other),
        }
    }

    /// Eight digits at a time give what one at a time gives.
    #[test]
    fn eight_digits_are_read_as_their_value(value in 0u32..100_000_000, noise in any::<u8>(), at in 0usize..8) {
        let text = format!("{value:08}");
        prop_assert_eq!(eight_digits(text.as_bytes()), Some(value));
        let mut bytes = text.into_bytes();
        bytes[at] = noise;
        prop_assert_eq!(eight_digits(&bytes).is_some(), noise.is_ascii_digit());
    }

    /// Every number the fast path reads as a float is the correctly rounded `f64` of its
    /// text, then rounded to `f32`.
    #[test]
    fn numbers_are_read_correctly_rounded(text in number_text()) {
        // Integers follow serde_json's integer rules instead (checked above).
        prop_assume!(text.contains(['.', 'e', 'E']));
        let body = format!(
            r#"{{"inputs": [{{"name": "x", "shape": [1], "datatype": "FP32", "data": [{text}]}}]}}"#
        );
        if let Some(request) = read(body.as_bytes()) {
            let TensorData::Fp32(values) = &request.inputs[0].data else {
                unreachable!("an FP32 input");
            };
            let expected = text.parse::<f64>().unwrap() as f32;
            prop_assert_eq!(values[0].to_bits(), expected.to_bits(), "{}", text);
        }
    }
}

/// Regression: `[[1, 2], [3, 4]]` for shape `[1, 4]` was read as the four numbers it holds.
#[test]
fn data_nested_otherwise_than_its_shape_is_refused_on_both_paths() {
    let refused = [
        // `datatype` before `data`, and after it (read as FP32, then checked).
        r#"{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[[1,2],[3,4]]}]}"#,
        r#"{"inputs":[{"data":[[1,2],[3,4]],"datatype":"FP32","name":"x","shape":[1,4]}]}"#,
        r#"{"inputs":[{"data":[[1,2],[3,4]],"datatype":"INT64","name":"x","shape":[1,4]}]}"#,
        r#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP32","data":[[1,2,3,4]]}]}"#,
        r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2,3],[4]]}]}"#,
        r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,[2,3],4]}]}"#,
        r#"{"inputs":[{"name":"x","shape":[1,2,2],"datatype":"FP32","data":[[[1,2],3,4]]}]}"#,
        // Only serde's path reads strings.
        r#"{"inputs":[{"name":"t","shape":[1,4],"datatype":"BYTES","data":[["a","b"],["c","d"]]}]}"#,
    ];
    for body in refused {
        assert!(read(body.as_bytes()).is_none(), "fast path took {body}");
        let refused = crate::api::oip::read_request(body.as_bytes(), None).unwrap_err();
        assert!(refused.contains("nested"), "{body}: {refused}");
    }
    let message = crate::api::oip::read_request(refused[0].as_bytes(), None).unwrap_err();
    assert_eq!(
        message,
        "input \"x\": data is nested as [2, 2], which is not its shape [1, 4]; give the data \
         flat, or nested exactly as the shape"
    );

    // Flat data fits any shape, and data nested as its shape is read as before, on the fast
    // path.
    let fitting = [
        r#"{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#,
        r#"{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[[1,2,3,4]]}]}"#,
        r#"{"inputs":[{"data":[[1,2],[3,4]],"datatype":"INT64","name":"x","shape":[2,2]}]}"#,
        r#"{"inputs":[{"name":"x","shape":[1,2,2],"datatype":"FP32","data":[[[1,2],[3,4]]]}]}"#,
        r#"{"inputs":[{"name":"x","shape":[2,0],"datatype":"FP32","data":[[],[]]}]}"#,
    ];
    for body in fitting {
        let fast = read(body.as_bytes()).unwrap_or_else(|| panic!("fast path refused {body}"));
        let slow = read_with_serde(body.as_bytes()).unwrap();
        assert!(same_bits(&fast, &slow), "{body}");
    }
}
