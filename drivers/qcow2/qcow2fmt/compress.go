package qcow2fmt

import (
	"bytes"
	"compress/flate"
	"errors"
	"io"
	"sync"

	kflate "github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// ErrDecompress reports compressed cluster data that does not decompress
// to a whole cluster.
var ErrDecompress = errors.New("compressed cluster data is damaged")

type flateState struct {
	br bytes.Reader
	fr io.ReadCloser
}

var flatePool = sync.Pool{New: func() any { return &flateState{} }}

type zstdState struct {
	br bytes.Reader
	d  *zstd.Decoder
}

var zstdPool = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxMemory(64<<20))
	if err != nil {
		return nil
	}
	return &zstdState{d: d}
}}

// Decompress fills dst (one cluster) from the compressed data in src,
// which may carry trailing bytes (the descriptor's size is only known to
// the sector). Type is CompressionZlib (raw deflate, as QEMU writes it) or
// CompressionZstd (one or more zstd frames).
func Decompress(typ uint8, dst, src []byte) error {
	switch typ {
	case CompressionZlib:
		st := flatePool.Get().(*flateState)
		defer flatePool.Put(st)
		st.br.Reset(src)
		if st.fr == nil {
			st.fr = flate.NewReader(&st.br)
		} else if err := st.fr.(flate.Resetter).Reset(&st.br, nil); err != nil {
			return ErrDecompress
		}
		if _, err := io.ReadFull(st.fr, dst); err != nil {
			return ErrDecompress
		}
		return nil
	case CompressionZstd:
		v := zstdPool.Get()
		st, _ := v.(*zstdState)
		if st == nil {
			return errors.New("zstd decoder unavailable")
		}
		defer zstdPool.Put(st)
		st.br.Reset(src)
		if err := st.d.Reset(&st.br); err != nil {
			return ErrDecompress
		}
		if _, err := io.ReadFull(st.d, dst); err != nil {
			return ErrDecompress
		}
		return nil
	}
	return errorf("qcow2: unknown compression type: %d", typ)
}

// Compress compresses one cluster the way QEMU does (raw deflate with a
// 4 KiB window, or a zstd frame) and returns the compressed
// bytes, or nil when the result would not be smaller than the cluster.
func Compress(typ uint8, src []byte) ([]byte, error) {
	var b bytes.Buffer
	switch typ {
	case CompressionZlib:
		// QEMU inflates with a 4 KiB window: no match may reach further.
		w, err := kflate.NewWriterWindow(&b, 4096)
		if err != nil {
			return nil, err
		}
		if _, err := w.Write(src); err != nil {
			return nil, err
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
	case CompressionZstd:
		e, err := zstd.NewWriter(&b, zstd.WithEncoderConcurrency(1))
		if err != nil {
			return nil, err
		}
		if _, err := e.Write(src); err != nil {
			return nil, err
		}
		if err := e.Close(); err != nil {
			return nil, err
		}
	default:
		return nil, errorf("qcow2: unknown compression type: %d", typ)
	}
	if b.Len() >= len(src) {
		return nil, nil
	}
	return b.Bytes(), nil
}
