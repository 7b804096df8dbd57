package keyval

import (
	"errors"
	"reflect"
	"testing"
)

func TestParseQemuOptsList(t *testing.T) {
	type opts = []QemuOpt
	tests := []struct {
		name, in, implied string
		want              *QemuOpts
		err               string
	}{
		// Cases from QEMU's tests/unit/test-qemu-opts.c (test_opts_parse).
		{name: "nothing", in: "", want: &QemuOpts{}},
		{name: "empty key", in: "=val", want: &QemuOpts{Opts: opts{{"", "val"}}}},
		{name: "last wins", in: "a=1,b=2,,x,a=3", want: &QemuOpts{Opts: opts{{"a", "1"}, {"b", "2,x"}, {"a", "3"}}}},
		{name: "first id", in: "id=foo,id=bar", want: &QemuOpts{ID: "foo", HasID: true}},
		{name: "trailing comma", in: "x=y,", want: &QemuOpts{Opts: opts{{"x", "y"}}}},
		{name: "lone comma", in: ",", want: &QemuOpts{Opts: opts{{"", "on"}},
			Warnings: []string{"short-form boolean option '' deprecated\nPlease use =on instead"}}},
		{name: "id in value", in: "x=,,id=bar", want: &QemuOpts{Opts: opts{{"x", ",id=bar"}}}},
		{name: "anti-social id", in: "id=666", err: "Parameter 'id' expects an identifier"},
		{name: "implied value", in: "an,noaus,noaus=", want: &QemuOpts{
			Opts: opts{{"an", "on"}, {"aus", "off"}, {"noaus", ""}},
			Warnings: []string{
				"short-form boolean option 'an' deprecated\nPlease use an=on instead",
				"short-form boolean option 'noaus' deprecated\nPlease use aus=off instead",
			}}},
		{name: "negated empty key", in: "no", want: &QemuOpts{Opts: opts{{"", "off"}},
			Warnings: []string{"short-form boolean option 'no' deprecated\nPlease use =off instead"}}},
		{name: "implied key", in: "an,noaus,noaus=", implied: "implied", want: &QemuOpts{
			Opts:     opts{{"implied", "an"}, {"aus", "off"}, {"noaus", ""}},
			Warnings: []string{"short-form boolean option 'noaus' deprecated\nPlease use aus=off instead"}}},
		{name: "implied empty value", in: ",", implied: "implied", want: &QemuOpts{Opts: opts{{"implied", ""}}}},
		{name: "implied comma value", in: ",,,a=1", implied: "implied", want: &QemuOpts{Opts: opts{{"implied", ","}, {"a", "1"}}}},
		{name: "empty key not implied", in: "=val", implied: "implied", want: &QemuOpts{Opts: opts{{"", "val"}}}},

		// --chardev shapes.
		{name: "chardev socket", in: "socket,id=c,path=/s,server=on,wait=off", implied: "backend", want: &QemuOpts{
			ID: "c", HasID: true, Opts: opts{{"backend", "socket"}, {"path", "/s"}, {"server", "on"}, {"wait", "off"}}}},
		{name: "chardev short booleans", in: "socket,id=c,path=/s,server,nowait", implied: "backend", want: &QemuOpts{
			ID: "c", HasID: true, Opts: opts{{"backend", "socket"}, {"path", "/s"}, {"server", "on"}, {"wait", "off"}},
			Warnings: []string{
				"short-form boolean option 'server' deprecated\nPlease use server=on instead",
				"short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
			}}},
		{name: "chardev fd", in: "socket,id=m,fd=3", implied: "backend", want: &QemuOpts{
			ID: "m", HasID: true, Opts: opts{{"backend", "socket"}, {"fd", "3"}}}},
		{name: "nodelay", in: "nodelay", want: &QemuOpts{Opts: opts{{"delay", "off"}},
			Warnings: []string{"short-form boolean option 'nodelay' deprecated\nPlease use nodelay=on instead"}}},
		{name: "delay", in: "delay", want: &QemuOpts{Opts: opts{{"delay", "on"}},
			Warnings: []string{"short-form boolean option 'delay' deprecated\nPlease use nodelay=off instead"}}},
		{name: "comma in path", in: "socket,id=c,path=/a,,b", implied: "backend", want: &QemuOpts{
			ID: "c", HasID: true, Opts: opts{{"backend", "socket"}, {"path", "/a,b"}}}},
		{name: "implied value with comma and equals", in: "a,,b=c", implied: "backend", want: &QemuOpts{Opts: opts{{"backend", "a,b=c"}}}},
		{name: "id first", in: "id=c,socket", implied: "backend", want: &QemuOpts{ID: "c", HasID: true,
			Opts:     opts{{"socket", "on"}},
			Warnings: []string{"short-form boolean option 'socket' deprecated\nPlease use socket=on instead"}}},
		{name: "implied id", in: "id,path=/s", implied: "backend", want: &QemuOpts{ID: "on", HasID: true, Opts: opts{{"backend", "id"}, {"path", "/s"}}}},
		{name: "negated id", in: "socket,noid", implied: "backend", want: &QemuOpts{ID: "off", HasID: true, Opts: opts{{"backend", "socket"}},
			Warnings: []string{"short-form boolean option 'noid' deprecated\nPlease use id=off instead"}}},
		{name: "empty id", in: "socket,id=", implied: "backend", err: "Parameter 'id' expects an identifier"},
		{name: "id with punctuation", in: "id=a-b.c_d9", want: &QemuOpts{ID: "a-b.c_d9", HasID: true}},
		{name: "bad id before help", in: "help,id=1", err: "Parameter 'id' expects an identifier"},
		{name: "help", in: "socket,id=c,help,path=/s", implied: "backend", want: &QemuOpts{
			ID: "c", HasID: true, Opts: opts{{"backend", "socket"}}, Help: true}},
		{name: "question mark", in: "?", want: &QemuOpts{Help: true}},
		{name: "implied help is a value", in: "help", implied: "backend", want: &QemuOpts{Opts: opts{{"backend", "help"}}}},
		{name: "nohelp", in: "nohelp", want: &QemuOpts{Opts: opts{{"help", "off"}},
			Warnings: []string{"short-form boolean option 'nohelp' deprecated\nPlease use help=off instead"}}},
		{name: "double comma in flag", in: "a,,b", want: &QemuOpts{Opts: opts{{"a", "on"}, {"", "on"}, {"b", "on"}},
			Warnings: []string{
				"short-form boolean option 'a' deprecated\nPlease use a=on instead",
				"short-form boolean option '' deprecated\nPlease use =on instead",
				"short-form boolean option 'b' deprecated\nPlease use b=on instead",
			}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseQemuOptsList(tt.in, tt.implied)
			if tt.err != "" {
				if err == nil || err.Error() != tt.err {
					t.Fatalf("got %+v, %v; want error %q", got, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error %q", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestParseQemuOpts(t *testing.T) {
	tests := []struct {
		in, implied string
		want        map[string]string
		order       []string
		err         error
	}{
		{in: "socket,id=c,path=/s,server=on,wait=off", implied: "backend",
			want:  map[string]string{"backend": "socket", "id": "c", "path": "/s", "server": "on", "wait": "off"},
			order: []string{"id", "backend", "path", "server", "wait"}},
		{in: "a=1,b=2,a=3,id=x,id=y",
			want:  map[string]string{"a": "3", "b": "2", "id": "x"},
			order: []string{"id", "a", "b"}},
		{in: "", want: map[string]string{}},
		{in: "socket,help", implied: "backend", err: ErrHelp},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, order, err := ParseQemuOpts(tt.in, tt.implied)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("error %v, want %v", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) || !reflect.DeepEqual(order, tt.order) {
				t.Fatalf("got %v %q, want %v %q", got, order, tt.want, tt.order)
			}
		})
	}
}

func TestQemuOptsGet(t *testing.T) {
	o, err := ParseQemuOptsList("a=1,b=2,a=3,id=x", "")
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := o.Get("a"); !ok || v != "3" {
		t.Fatalf("Get(a) = %q, %v", v, ok)
	}
	if _, ok := o.Get("id"); ok {
		t.Fatal("Get(id) found the id")
	}
	if _, ok := o.Get("c"); ok {
		t.Fatal("Get(c) found a value")
	}
}
