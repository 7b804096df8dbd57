package qapi

import (
	"encoding/json"
	"strings"
	"testing"
)

type drv string

func (drv) EnumValues() []string { return []string{"file", "raw"} }

type cacheOpts struct {
	Direct  *bool `json:"direct,omitempty"`
	NoFlush *bool `json:"no-flush,omitempty"`
}

type base struct {
	Driver   drv        `json:"driver"`
	NodeName string     `json:"node-name,omitempty"`
	Cache    *cacheOpts `json:"cache,omitempty"`
	ReadOnly bool       `json:"read-only,omitempty"`
}

type fileOpts struct {
	Filename string   `json:"filename"`
	Size     Size     `json:"size,omitempty"`
	Count    int32    `json:"count,omitempty"`
	List     []string `json:"list,omitempty"`
}

func tree(t *testing.T, s string) any {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct {
		in     string
		keyval bool
		err    string
	}{
		{`{"driver":"file","filename":"a"}`, false, ""},
		{`{"driver":"file"}`, false, "Parameter 'filename' is missing"},
		{`{"driver":"bogus","filename":"a"}`, false, "Parameter 'driver' does not accept value 'bogus'"},
		{`{"driver":1,"filename":"a"}`, false, "Invalid parameter type for 'driver', expected: string"},
		{`{"driver":"file","filename":"a","x":1}`, false, "Parameter 'x' is unexpected"},
		{`{"driver":"file","filename":"a","cache":{"direct":1}}`, false, "Invalid parameter type for 'cache.direct', expected: boolean"},
		{`{"driver":"file","filename":"a","cache":{"bogus":true}}`, false, "Parameter 'cache.bogus' is unexpected"},
		{`{"driver":"file","filename":"a","cache":"x"}`, false, "Invalid parameter type for 'cache', expected: object"},
		{`{"driver":"file","filename":"a","read-only":"on"}`, true, ""},
		{`{"driver":"file","filename":"a","read-only":"maybe"}`, true, "Parameter 'read-only' expects 'on' or 'off'"},
		{`{"driver":"file","filename":"a","size":"1G"}`, true, ""},
		{`{"driver":"file","filename":"a","size":"1Q"}`, true, "Parameter 'size' expects size"},
		{`{"driver":"file","filename":"a","count":3000000000}`, false, "Parameter 'count' expects int32_t"},
		{`{"driver":"file","filename":"a","list":["a",1]}`, false, "Invalid parameter type for 'list[1]', expected: string"},
	} {
		var b base
		var f fileOpts
		err := Decode(tree(t, tc.in), tc.keyval, &b, &f)
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != tc.err {
			t.Errorf("%s: got %q want %q", tc.in, got, tc.err)
		}
	}
}

func TestDecodeValues(t *testing.T) {
	var b base
	var f fileOpts
	if err := Decode(tree(t, `{"driver":"raw","node-name":"n","cache":{"direct":"on"},"filename":"x","size":"1.5k","list":["a"]}`), true, &b, &f); err != nil {
		t.Fatal(err)
	}
	if b.Driver != "raw" || b.NodeName != "n" || b.Cache == nil || b.Cache.Direct == nil || !*b.Cache.Direct || f.Size != 1536 || len(f.List) != 1 {
		t.Fatalf("decoded %+v %+v", b, f)
	}
}

func TestMarshalQDictOrder(t *testing.T) {
	type qv struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
		Micro int `json:"micro"`
	}
	type ver struct {
		Qemu    qv     `json:"qemu"`
		Package string `json:"package"`
	}
	got := string(Marshal(map[string]any{"QMP": map[string]any{"version": ver{qv{7, 2, 22}, ""}, "capabilities": []string{"oob"}}}))
	want := `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}`
	if got != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
	if got := string(Marshal("é\x01\"")); got != `"\u00E9\u0001\""` {
		t.Fatalf("escape: %s", got)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"0": 0, "512": 512, "1k": 1024, "1M": 1 << 20, "2G": 2 << 30, "1.5k": 1536, "16E": 0} {
		got, err := ParseSize(in)
		if in == "16E" {
			if err == nil {
				t.Errorf("16E accepted")
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("%s: %d %v", in, got, err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(`{"driver":"file","filename":"a","cache":{"direct":true}}`, false)
	f.Add(`{"driver":"file","filename":"a","size":"1G"}`, true)
	f.Fuzz(func(t *testing.T, s string, keyval bool) {
		d := json.NewDecoder(strings.NewReader(s))
		d.UseNumber()
		var v any
		if d.Decode(&v) != nil {
			return
		}
		var b base
		var fo fileOpts
		_ = Decode(v, keyval, &b, &fo)
		_ = Marshal(v)
	})
}
