package keyval

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

type obj = map[string]any
type list = []any

var long = strings.Repeat("a", 127) + "z" // 128 characters

type parseTest struct {
	name    string
	in      string
	implied string
	want    obj
	err     string
}

var parseTests = []parseTest{
	// Cases from QEMU's tests/unit/test-keyval.c (test_keyval_parse).
	{name: "nothing", in: "", want: obj{}},
	{name: "empty key", in: "=val", err: "Invalid parameter ''"},
	{name: "empty fragment", in: ".", err: "Invalid parameter '.'"},
	{name: "empty trailing fragment", in: "key.", err: "Invalid parameter 'key.'"},
	{name: "invalid key", in: "7up=val", err: "Invalid parameter '7up'"},
	{name: "overlong key", in: long + "=v", err: "Parameter '" + long + "' is too long"},
	{name: "overlong fragment", in: "k." + long + "=v", err: "Parameter fragment '" + long + "' is too long"},
	{name: "long key", in: long[1:] + "=v", want: obj{long[1:]: "v"}},
	{name: "long fragment", in: "k." + long[1:] + "=v", want: obj{"k": obj{long[1:]: "v"}}},
	{name: "crap after key", in: "key[0]=val", err: "Invalid parameter 'key[0]'"},
	{name: "last wins", in: "a=1,b=2,,x,a=3", want: obj{"a": "3", "b": "2,x"}},
	{name: "last id wins", in: "id=foo,id=bar", want: obj{"id": "bar"}},
	{name: "dotted", in: "a.b.c=1,a.b.c=2,d=3", want: obj{"a": obj{"b": obj{"c": "2"}}, "d": "3"}},
	{name: "inconsistent leaf then object", in: "a.b=1,a=2", err: "Parameters 'a.*' used inconsistently"},
	{name: "inconsistent object then leaf", in: "a=1,a.b=2", err: "Parameters 'a.*' used inconsistently"},
	{name: "inconsistent deeper", in: "a.b=1,a.b.c=2", err: "Parameters 'a.b.*' used inconsistently"},
	{name: "trailing comma", in: "x=y,", want: obj{"x": "y"}},
	{name: "lone comma", in: ",", err: "Invalid parameter ''"},
	{name: "comma id in value", in: "x=,,id=bar", want: obj{"x": ",id=bar"}},
	{name: "anti-social id", in: "id=666", want: obj{"id": "666"}},
	{name: "no implied value", in: "an,noaus,noaus=", err: "Expected '=' after parameter 'an'"},
	{name: "key no", in: "no", err: "Expected '=' after parameter 'no'"},
	{name: "implied key", in: "an,aus=off,noaus=", implied: "implied", want: obj{"implied": "an", "aus": "off", "noaus": ""}},
	{name: "implied dotted key", in: "val", implied: "eins.zwei", want: obj{"eins": obj{"zwei": "val"}}},
	{name: "implied empty value", in: ",", implied: "implied", err: "Invalid parameter ''"},
	{name: "implied comma value", in: ",,,a=1", implied: "implied", err: "Invalid parameter ''"},
	{name: "implied value with comma", in: "val,,ue", implied: "implied", err: "Invalid parameter ''"},
	{name: "empty key not implied", in: "=val", implied: "implied", err: "Invalid parameter ''"},
	{name: "help unavailable", in: "help", err: "Help is not available for this option"},
	{name: "help unavailable implied", in: "help", implied: "implied", err: "Help is not available for this option"},
	{name: "question mark", in: "a=b,?", err: "Help is not available for this option"},
	{name: "key help", in: "help=on", want: obj{"help": "on"}},
	{name: "help then crap", in: "help.abc", err: "Expected '=' after parameter 'help.abc'"},
	{name: "help then crap implied", in: "help.abc", implied: "implied", want: obj{"implied": "help.abc"}},
	{name: "parse error before help", in: "help,7=1", err: "Invalid parameter '7'"},

	// Cases from test_keyval_parse_list.
	{name: "root list", in: "0=1", err: "Invalid parameter '0'"},
	{name: "list out of order", in: "list.0=null,list.2=zwei,list.1=eins", want: obj{"list": list{"null", "eins", "zwei"}}},
	{name: "list repeated index", in: "list.1=goner,list.0=null,list.01=eins,list.2=zwei", want: obj{"list": list{"null", "eins", "zwei"}}},
	{name: "list deeper", in: "a.list.1=eins,a.list.00=null,a.list.2=zwei", want: obj{"a": obj{"list": list{"null", "eins", "zwei"}}}},
	{name: "list and dict", in: "a.b.c=1,a.b.0=2", err: "Parameters 'a.b.*' used inconsistently"},
	{name: "list and dict above", in: "a.0.c=1,a.b.c=2", err: "Parameters 'a.*' used inconsistently"},
	{name: "missing index 0", in: "list.1=lonely", err: "Parameter 'list.0' missing"},
	{name: "missing index 1", in: "list.0=null,list.2=eins,list.02=zwei", err: "Parameter 'list.1' missing"},

	// Visitor test inputs whose parse results are checked there.
	{name: "empty leaf", in: "a.b=", want: obj{"a": obj{"b": ""}}},
	{name: "nested lists", in: "a.0=,a.1=I,a.2.0=II", want: obj{"a": list{"", "I", list{"II"}}}},
	{name: "list of lists", in: "a.0=,b.0.0=head", want: obj{"a": list{""}, "b": list{list{"head"}}}},

	// qemu-storage-daemon shapes.
	{name: "blockdev", in: "file,node-name=f,filename=/tmp/a,,b.img,cache.direct=on", implied: "driver",
		want: obj{"driver": "file", "node-name": "f", "filename": "/tmp/a,b.img", "cache": obj{"direct": "on"}}},
	{name: "blockdev inline child", in: "driver=qcow2,node-name=q,file.driver=file,file.filename=/x", implied: "driver",
		want: obj{"driver": "qcow2", "node-name": "q", "file": obj{"driver": "file", "filename": "/x"}}},
	{name: "export bitmaps", in: "nbd,id=e,node-name=n,bitmaps.0=a,bitmaps.1=b", implied: "type",
		want: obj{"type": "nbd", "id": "e", "node-name": "n", "bitmaps": list{"a", "b"}}},
	{name: "object secret", in: "secret,id=sec0,data=a,,b=c", implied: "qom-type",
		want: obj{"qom-type": "secret", "id": "sec0", "data": "a,b=c"}},
	{name: "nbd-server flat address", in: "addr.type=unix,addr.path=/s", want: obj{"addr": obj{"type": "unix", "path": "/s"}}},
	{name: "implied only first", in: "a=1,b", implied: "driver", err: "Expected '=' after parameter 'b'"},
	{name: "implied not given", in: "file", err: "Expected '=' after parameter 'file'"},
	{name: "implied after key-val", in: "filename=x,file", implied: "driver", err: "Expected '=' after parameter 'file'"},
	{name: "value with equals", in: "a=b=c", want: obj{"a": "b=c"}},
	{name: "empty value at end", in: "a=", want: obj{"a": ""}},
	{name: "comma at end of value", in: "a=b,,", want: obj{"a": "b,"}},
	{name: "empty element", in: "a=1,,", want: obj{"a": "1,"}},
	{name: "double comma element", in: "a=1,,,b=2", want: obj{"a": "1,", "b": "2"}},
	{name: "leading comma", in: ",a=1", err: "Invalid parameter ''"},
	{name: "downstream name", in: "__com.redhat_x=1", want: obj{"__com.redhat_x": "1"}},
	{name: "bad downstream name", in: "__com.redhat=1", err: "Invalid parameter '__com.redhat'"},
	{name: "single underscore", in: "_x=1", err: "Invalid parameter '_x'"},
	{name: "underscore and dash", in: "a_b-c=1", want: obj{"a_b-c": "1"}},
	{name: "index then crap", in: "a.0b=1", err: "Invalid parameter 'a.0b'"},
	{name: "deep index", in: "a.0.b=1,a.1.b=2", want: obj{"a": list{obj{"b": "1"}, obj{"b": "2"}}}},
	{name: "huge index", in: "a.99999999999999999999999=x", err: "Parameter 'a.0' missing"},
	{name: "huge index after 0", in: "a.0=x,a.99999999999=y", err: "Parameter 'a.1' missing"},
	{name: "gap", in: "a.0=x,a.2=y", err: "Parameter 'a.1' missing"},
	{name: "mixed index and name", in: "a.0=x,a.b=y", err: "Parameters 'a.*' used inconsistently"},
	{name: "index replaced", in: "a.0=x,a.0=y", want: obj{"a": list{"y"}}},
	{name: "unicode value", in: "a=é", want: obj{"a": "é"}},
	{name: "space in key", in: "a b=1", err: "Invalid parameter 'a b'"},
}

func TestParse(t *testing.T) {
	for _, tt := range parseTests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.in, tt.implied)
			check(t, got, err, tt.want, tt.err)
		})
	}
}

func check(t *testing.T, got any, err error, want obj, wantErr string) {
	t.Helper()
	if wantErr != "" {
		if err == nil {
			t.Fatalf("got %#v, want error %q", got, wantErr)
		}
		if err.Error() != wantErr {
			t.Fatalf("error %q, want %q", err, wantErr)
		}
		return
	}
	if err != nil {
		t.Fatalf("unexpected error %q", err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v\nwant %#v", got, want)
	}
}

func TestParseHelp(t *testing.T) {
	tests := []struct {
		in, implied string
		want        obj
		help        bool
		err         string
	}{
		// From test_keyval_parse.
		{in: "help", want: obj{}, help: true},
		{in: "help", implied: "implied", want: obj{}, help: true},
		{in: "?", implied: "implied", want: obj{}, help: true},
		{in: "help=on", want: obj{"help": "on"}},
		{in: "help.abc", err: "Expected '=' after parameter 'help.abc'"},
		{in: "help.abc", implied: "implied", want: obj{"implied": "help.abc"}},
		{in: "number=42,help,foo=bar", want: obj{"number": "42", "foo": "bar"}, help: true},
		{in: "val,help,foo=bar", implied: "implied", want: obj{"implied": "val", "foo": "bar"}, help: true},
		// --object shapes.
		{in: "secret,help", implied: "qom-type", want: obj{"qom-type": "secret"}, help: true},
		{in: "helpx", implied: "qom-type", want: obj{"qom-type": "helpx"}},
		{in: "?x", implied: "qom-type", want: obj{"qom-type": "?x"}},
		{in: `{"qom-type":"secret","id":"s"}`, want: obj{"qom-type": "secret", "id": "s"}},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, help, err := ParseHelp(tt.in, tt.implied)
			check(t, got, err, tt.want, tt.err)
			if err == nil && help != tt.help {
				t.Fatalf("help = %v, want %v", help, tt.help)
			}
		})
	}
}

var (
	deep    = strings.Repeat(`{"a":`, 1024) + "1" + strings.Repeat("}", 1024)
	tooDeep = strings.Repeat(`{"a":`, 1025) + "1" + strings.Repeat("}", 1025)
)

var jsonTests = []struct {
	name, in string
	want     obj
	err      string
}{
	{name: "object", in: `{"driver":"file","filename":"/x","read-only":true,"size":1024,"f":-1.5e3,"n":null}`,
		want: obj{"driver": "file", "filename": "/x", "read-only": true, "size": json.Number("1024"), "f": json.Number("-1.5e3"), "n": nil}},
	{name: "nested", in: `{"file":{"driver":"file"},"bitmaps":["a",{"node":"n","name":"b"}],"e":[]}`,
		want: obj{"file": obj{"driver": "file"}, "bitmaps": list{"a", obj{"node": "n", "name": "b"}}, "e": list{}}},
	{name: "empty", in: `{}`, want: obj{}},
	{name: "whitespace", in: "{ \"a\" : 1 }\n ", want: obj{"a": json.Number("1")}},
	{name: "big number", in: `{"a":18446744073709551616}`, want: obj{"a": json.Number("18446744073709551616")}},
	{name: "duplicate key", in: `{"a":1,"a":2}`, err: "JSON parse error, duplicate key"},
	{name: "nested duplicate key", in: `{"a":{"b":1,"b":1}}`, err: "JSON parse error, duplicate key"},
	{name: "duplicate key in list", in: `{"a":[{"b":1,"b":1}]}`, err: "JSON parse error, duplicate key"},
	{name: "same key at two levels", in: `{"a":{"a":1}}`, want: obj{"a": obj{"a": json.Number("1")}}},
	{name: "trailing value", in: `{"a":1} {"b":2}`, err: "Expecting at most one JSON value"},
	{name: "trailing garbage", in: `{"a":1}x`, err: "Expecting at most one JSON value"},
	{name: "trailing brace", in: `{"a":1}}`, err: "Expecting at most one JSON value"},
	{name: "truncated", in: `{"a":1`, err: "JSON parse error, premature EOI"},
	{name: "truncated after comma", in: `{"a":1,`, err: "JSON parse error, premature EOI"},
	{name: "lone brace", in: `{`, err: "JSON parse error, premature EOI"},
	{name: "missing value", in: `{"a":}`, err: "JSON parse error, expecting value"},
	{name: "missing colon", in: `{"a" 1}`, err: "JSON parse error, missing : in object pair"},
	{name: "missing comma", in: `{"a":1 "b":2}`, err: "JSON parse error, expected separator in dict"},
	{name: "key not string", in: `{1:2}`, err: "JSON parse error, key is not a string in object"},
	{name: "trailing comma in object", in: `{"a":1,}`, err: "JSON parse error, expecting value"},
	{name: "trailing comma in list", in: `{"a":[1,]}`, err: "JSON parse error, expecting value"},
	{name: "colon for key", in: `{:1}`, err: "JSON parse error, expecting value"},
	{name: "list as key", in: `{[1]:1}`, err: "JSON parse error, key is not a string in object"},
	{name: "key without value", in: `{"a":1,"b"}`, err: "JSON parse error, missing : in object pair"},
	{name: "error in duplicate's value first", in: `{"a":1,"a":}`, err: "JSON parse error, expecting value"},
	{name: "list separator", in: `{"a":[1 2]}`, err: "JSON parse error, expected separator in list"},
	{name: "impossible byte", in: "{\"a\":\"\xff\"}", err: "JSON parse error, stray '\"\xff'"},
	{name: "invalid utf-8", in: "{\"a\":\"\xc3(\"}", err: "JSON parse error, invalid UTF-8 sequence in string"},
	{name: "overlong utf-8", in: "{\"a\":\"\xc1\xbf\"}", err: "JSON parse error, invalid UTF-8 sequence in string"},
	{name: "raw noncharacter", in: "{\"a\":\"\xef\xbf\xbf\"}", err: "JSON parse error, invalid UTF-8 sequence in string"},
	{name: "utf-8", in: `{"a":"é€😀"}`, want: obj{"a": "é€😀"}},
	{name: "modified utf-8 nul", in: "{\"a\":\"\xc0\x80\"}", want: obj{"a": "\xc0\x80"}},
	{name: "escaped nul", in: `{"a":"\u0000x"}`, want: obj{"a": "\xc0\x80x"}},
	{name: "escapes", in: `{"a":"\"\'\\\/\b\f\n\r\t\u00e9\ud83d\ude00"}`, want: obj{"a": "\"'\\/\b\f\n\r\té😀"}},
	{name: "escaped noncharacter", in: `{"a":"\uFFFF"}`, err: `JSON parse error, \uFFFF is not a valid Unicode character`},
	{name: "short escape", in: `{"a":"\u12"}`, err: `JSON parse error, \u12" is not a valid Unicode character`},
	{name: "lone surrogate", in: `{"a":"\ud800"}`, err: `JSON parse error, \ud800 is not a valid Unicode character`},
	{name: "bad surrogate pair", in: `{"a":"\ud800\u0041"}`, err: `JSON parse error, \ud800 is not a valid Unicode character`},
	{name: "bad escape", in: `{"a":"\q"}`, err: "JSON parse error, invalid escape sequence in string"},
	{name: "control character", in: "{\"a\":\"\t\"}", err: "JSON parse error, stray '\"\t'"},
	{name: "single quotes", in: `{'a':'b"c','d':'\'e'}`, want: obj{"a": `b"c`, "d": "'e"}},
	{name: "single and double duplicate", in: `{'a':1,"a":2}`, err: "JSON parse error, duplicate key"},
	{name: "keywords", in: `{"t":true,"f":false,"n":null}`, want: obj{"t": true, "f": false, "n": nil}},
	{name: "bad keyword", in: `{"a":tru}`, err: "JSON parse error, invalid keyword 'tru'"},
	// QEMU formats parse errors into a 1024-byte buffer.
	{name: "long keyword", in: `{"a":` + strings.Repeat("z", 2000) + `}`, err: "JSON parse error, invalid keyword '" + strings.Repeat("z", 1006)},
	{name: "capital keyword", in: `{"a":True}`, err: "JSON parse error, stray 'T'"},
	{name: "leading zero", in: `{"a":01}`, err: "JSON parse error, stray '01'"},
	{name: "lone minus", in: `{"a":-}`, err: "JSON parse error, stray '-}'"},
	{name: "bare dot", in: `{"a":1.}`, err: "JSON parse error, stray '1.}'"},
	{name: "bare exponent", in: `{"a":1e}`, err: "JSON parse error, stray '1e}'"},
	{name: "numbers", in: `{"a":-0,"b":0.5,"c":1E+2,"d":-1e-2,"e":123}`,
		want: obj{"a": json.Number("-0"), "b": json.Number("0.5"), "c": json.Number("1E+2"), "d": json.Number("-1e-2"), "e": json.Number("123")}},
	{name: "stray after error", in: `{"a":?}`, err: "JSON parse error, stray '?'"},
	{name: "lexical error wins", in: `{1=2}`, err: "JSON parse error, stray '='"},
	{name: "interpolation", in: `{"a":%d}`, err: "JSON parse error, stray '%'"},
	{name: "control character resets", in: "{\"a\":1}\x01", err: "Expecting at most one JSON value"},
	{name: "nul ends input", in: "{\"a\":1}\x00garbage", want: obj{"a": json.Number("1")}},
	{name: "unterminated string", in: `{"a`, err: `JSON parse error, stray '"a'`},
	{name: "max nesting", in: deep, want: nest(1024)},
	{name: "too deep", in: tooDeep, err: "JSON nesting depth limit exceeded"},
	{name: "too deep list", in: `{"a":` + strings.Repeat("[", 1024) + strings.Repeat("]", 1024) + "}", err: "JSON nesting depth limit exceeded"},
}

func TestParseJSON(t *testing.T) {
	for _, tt := range jsonTests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.in, "driver")
			check(t, got, err, tt.want, tt.err)
		})
	}
}

func nest(n int) obj {
	var v any = json.Number("1")
	for i := 0; i < n; i++ {
		v = obj{"a": v}
	}
	return v.(obj)
}
