//! Tensor data as one byte frame for the MPI engine: a MessagePack header (shape and
//! dtype) behind its length, then the values' bytes as they lie.

use burn::tensor::{DType, TensorData};

/// `data` as one frame.
pub(crate) fn encode(data: TensorData) -> Vec<u8> {
    let header = rmp_serde::to_vec(&(data.shape.to_vec(), data.dtype)).expect("shapes and dtypes encode");
    let bytes = data.as_bytes();
    let mut out = Vec::with_capacity(4 + header.len() + bytes.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(bytes);
    out
}

/// The tensor data of a frame.
pub(crate) fn decode(frame: &[u8]) -> Result<TensorData, String> {
    if frame.len() < 4 {
        return Err(format!("a frame of {} bytes has no header", frame.len()));
    }
    let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
    if frame.len() < 4 + len {
        return Err(format!("a header of {len} bytes in a frame of {}", frame.len()));
    }
    let (shape, dtype): (Vec<usize>, DType) = rmp_serde::from_slice(&frame[4..4 + len]).map_err(|e| e.to_string())?;
    let values = frame[4 + len..].to_vec();
    let expected = shape.iter().product::<usize>() * dtype.size();
    if values.len() != expected {
        return Err(format!("{} value bytes for shape {shape:?} of {dtype:?} ({expected} expected)", values.len()));
    }
    Ok(TensorData::from_bytes_vec(values, shape, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_truncation() {
        let data = TensorData::new(vec![1.5f32, -2.0, 3.25, 0.0, 7.0, -0.5], [2, 3]);
        let frame = encode(data.clone());
        assert_eq!(decode(&frame).unwrap(), data);
        let ints = TensorData::new(vec![7u32, 1 << 31], [2]);
        assert_eq!(decode(&encode(ints.clone())).unwrap(), ints);
        let err = decode(&frame[..frame.len() - 1]).unwrap_err();
        assert!(err.contains("23 value bytes for shape [2, 3]"), "{err}");
        assert!(decode(&[1, 0]).is_err());
    }
}
