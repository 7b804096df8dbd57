package luksfmt

import (
	"bytes"
	"strings"
	"testing"
)

// Fuzz targets for the header parsers. Seeds are generated in code from
// headers this package creates. Run e.g.
//
//	go test -run '^$' -fuzz FuzzLUKS2JSON ./drivers/luks/luksfmt/

// checkOpened exercises the accessors of a header Open accepted and checks
// invariants every valid header satisfies.
func checkOpened(t *testing.T, h *Header) {
	in := h.Info()
	if h.HeaderSize() < luks1HdrLen || h.SectorSize() < 512 || h.SectorSize() > 4096 {
		t.Fatalf("header size %d, sector size %d", h.HeaderSize(), h.SectorSize())
	}
	if in.PayloadOffset != h.PayloadOffset() || in.UUID != h.UUID() || len(in.Slots) > h.MaxSlots() {
		t.Fatalf("inconsistent info %+v", in)
	}
	for _, s := range in.Slots {
		if s.Active && (s.KeyOffset < luks1HdrLen || s.Iters == 0) {
			t.Fatalf("bad active keyslot %+v", s)
		}
	}
	_ = h.CipherSpec()
	_, _ = h.PayloadSize()
	_ = h.ActiveSlots()
	_ = h.Damage()
}

func FuzzOpenLUKS1(f *testing.F) {
	for _, opts := range []CreateOptions{
		{Mode: "xts-plain64", KeySize: 32},
		{Mode: "xts-plain64", KeySize: 32, Detached: true},
		{Mode: "cbc-essiv:sha256", KeySize: 16, Hash: "sha1"},
		{Mode: "cbc-plain", KeySize: 32, Hash: "sha512", PayloadOffset: 2 << 20},
	} {
		dev, _, _ := create(f, opts)
		f.Add(dev.b[:luks1HdrLen])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, size := range []int64{-1, int64(len(data))} {
			h, err := Open(bytes.NewReader(data), size)
			if err != nil {
				continue
			}
			checkOpened(t, h)
			if h.Version() != 1 {
				// A LUKS2 header fitting the input is possible in principle
				// but needs valid checksums; still fine.
				continue
			}
			if po := h.PayloadOffset(); po != 0 && po < h.HeaderSize()-4095 {
				t.Fatalf("payload offset %d inside the header (%d)", po, h.HeaderSize())
			}
		}
	})
}

func FuzzOpenLUKS2(f *testing.F) {
	for _, opts := range []CreateOptions{
		{Version: 2, PayloadOffset: 1 << 20},
		{Version: 2, KDF: fastKDF(KDFPBKDF2), Detached: true, SectorSize: 4096, KeyslotsSize: 1 << 20},
	} {
		dev, _, _ := create(f, opts)
		f.Add(dev.b[:2*DefaultLUKS2HeaderSize])
		broken := bytes.Clone(dev.b[:2*DefaultLUKS2HeaderSize])
		broken[100] ^= 0xff // primary checksum: forces the secondary scan
		f.Add(broken)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, size := range []int64{-1, int64(len(data))} {
			if h, err := Open(bytes.NewReader(data), size); err == nil {
				checkOpened(t, h)
			}
		}
	})
}

// luks2Image builds a 32 KiB LUKS2 header (both copies, 16 KiB each) around
// a JSON text, with valid checksums.
func luks2Image(text []byte) []byte {
	img := make([]byte, 2*DefaultLUKS2HeaderSize)
	b := luks2Bin{hdrSize: DefaultLUKS2HeaderSize, seqid: 7, csumAlg: "sha256", uuid: "5a7d3f5e-9f0e-4f6f-9b8e-0123456789ab"}
	for i := range 2 {
		off := i * DefaultLUKS2HeaderSize
		b.hdrOffset = uint64(off)
		bin := b.encode(i == 1)
		area := img[off+luks2BinLen : off+DefaultLUKS2HeaderSize]
		copy(area, text)
		sum, _ := luks2Checksum("sha256", bin, area)
		copy(bin[off2Csum:], sum)
		copy(img[off:], bin)
	}
	return img
}

func FuzzLUKS2JSON(f *testing.F) {
	for _, opts := range []CreateOptions{
		{Version: 2, PayloadOffset: 1 << 20},
		{Version: 2, KDF: fastKDF(KDFPBKDF2), Detached: true, KeyslotsSize: 1 << 20},
		{Version: 2, KDF: fastKDF(KDFArgon2i), Mode: "cbc-essiv:sha256", KeySize: 32, SectorSize: 4096, PayloadOffset: 1 << 20},
	} {
		dev, h, key := create(f, opts)
		if _, err := h.AddKey(dev, key, 4, passB, fastKDF(KDFPBKDF2)); err != nil {
			f.Fatal(err)
		}
		text := getLUKS2JSON(dev, 0)
		f.Add([]byte(text))
		f.Add([]byte(strings.Replace(text, `"tokens":{}`, `"tokens":{"0":{"type":"x","keyslots":["4"],"u":[1,{"v":null}]}}`, 1)))
		f.Add([]byte(strings.Replace(text, `"config":{`, `"config":{"requirements":{"mandatory":[]},"flags":["allow-discards"],`, 1)))
	}
	f.Fuzz(func(t *testing.T, text []byte) {
		if len(text) >= DefaultLUKS2HeaderSize-luks2BinLen {
			return
		}
		img := luks2Image(text)
		h, err := Open(bytes.NewReader(img), -1)
		if err != nil {
			return
		}
		checkOpened(t, h)
		// The metadata must survive a rewrite: marshal, parse, marshal
		// again gives the same text.
		m := h.v2.meta
		out := m.marshal()
		m2, err := parseLUKS2Meta(out, DefaultLUKS2HeaderSize)
		if err != nil {
			t.Fatalf("rewritten metadata does not parse: %v\n%s", err, out)
		}
		if out2 := m2.marshal(); !bytes.Equal(out, out2) {
			t.Fatalf("rewrite is not stable:\n%s\n%s", out, out2)
		}
	})
}
