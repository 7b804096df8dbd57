package secrets

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/internal/keyval"
	"blockd/internal/testutil"
)

// optionsFromKeyval builds Options from a parsed --object argument.
func optionsFromKeyval(t *testing.T, m map[string]any) Options {
	t.Helper()
	var o Options
	for k, v := range m {
		s := v.(string)
		switch k {
		case "qom-type":
		case "id":
			o.ID = s
		case "data":
			o.Data = &s
		case "file":
			o.File = &s
		case "format":
			o.Format = Format(s)
		case "keyid":
			o.KeyID = s
		case "iv":
			o.IV = s
		case "loaded":
			b := s == "on"
			o.Loaded = &b
		default:
			t.Fatalf("unexpected property %q", k)
		}
	}
	return o
}

// TestQSDSecretErrors adds the same secrets to qemu-storage-daemon (as
// --object options) and to a Store, and compares the first error.
func TestQSDSecretErrors(t *testing.T) {
	qsd := testutil.NeedTool(t, "qemu-storage-daemon")
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	key := write("key", masterKey)
	nul := write("nul", []byte("YQ==\x00"))
	ct := b64(encrypt(t, masterKey, testIV, []byte("passphrase")))
	iv := b64(testIV)
	missing := filepath.Join(dir, "missing")

	tests := [][]string{
		{"secret,id=s"},
		{"secret,id=s,data=x,file=" + missing},
		{"secret,id=s,file=" + missing},
		{"secret,id=s,file=" + dir},
		{"secret,id=s,file=" + nul + ",format=base64"},
		{"secret,id=s,data=x,format=hex"},
		{"secret,id=0s,data=x"},
		{"secret,id=s,data=x,loaded=on"},
		{"secret,id=s,data=x", "secret,id=s"},
		{"secret,id=s,data=a!,format=base64"},
		{"secret,id=s,data=x,keyid=k,iv=" + iv},
		{"secret,id=k,data=short", "secret,id=s,data=x,keyid=k"},
		{"secret,id=k,file=" + key, "secret,id=s,data=x,keyid=k"},
		{"secret,id=k,file=" + key, "secret,id=s,data=x,keyid=k,iv=AAAA"},
		{"secret,id=k,file=" + key, "secret,id=s,data=x,keyid=k,iv=" + iv},
		{"secret,id=k,file=" + key, "secret,id=s,data=x!,keyid=k,iv=" + iv + ",format=base64"},
		{"secret,id=k,file=" + key, "secret,id=s,data=" + b64([]byte("0123456789abcdef")) + ",keyid=k,iv=" + iv + ",format=base64"},
		{"secret,id=s,data=x,keyid=s,iv=" + iv},
		// These succeed.
		{"secret,id=k,file=" + key, "secret,id=s,data=,keyid=k,iv=" + iv + ",format=base64"},
		{"secret,id=k,file=" + key, "secret,id=s,data=" + ct + ",keyid=k,iv=" + iv + ",format=base64"},
		{"secret,id=s,data=YQ,format=base64"},
	}
	for _, objects := range tests {
		var s Store
		var want string
		var failed string
		for _, arg := range objects {
			m, err := keyval.Parse(arg, "qom-type")
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Add(optionsFromKeyval(t, m)); err != nil {
				want, failed = err.Error(), arg
				break
			}
		}
		args := []string{}
		for _, arg := range objects {
			args = append(args, "--object="+arg)
		}
		// A failing option last makes the daemon exit once the objects
		// are added.
		args = append(args, "--blockdev=driver=bogus")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, _ := exec.CommandContext(ctx, qsd, args...).CombinedOutput()
		cancel()
		got := strings.SplitN(string(out), "\n", 2)[0]
		if want == "" {
			if !strings.Contains(got, "--blockdev=driver=bogus") {
				t.Errorf("%q: qemu-storage-daemon: %q, Store succeeds", objects, got)
			}
			continue
		}
		if got != "qemu-storage-daemon: --object="+failed+": "+want {
			t.Errorf("%q: qemu-storage-daemon: %q, Store: %q", objects, got, want)
		}
	}
}

// TestQEMUDecryptsLikeStore checks that QEMU decrypts a libvirt-style
// encrypted secret to the same passphrase as the Store: a LUKS image made
// with the encrypted secret opens with the Store's plaintext.
func TestQEMUDecryptsLikeStore(t *testing.T) {
	qemuImg := testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "master-key.aes")
	if err := os.WriteFile(keyFile, masterKey, 0o600); err != nil {
		t.Fatal(err)
	}
	ct := b64(encrypt(t, masterKey, testIV, []byte("correct horse, battery staple")))
	enc := "secret,id=sec0,data=" + ct + ",keyid=masterKey0,iv=" + b64(testIV) + ",format=base64"
	master := "secret,id=masterKey0,format=raw,file=" + keyFile

	var s Store
	for _, arg := range []string{master, enc} {
		m, err := keyval.Parse(arg, "qom-type")
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Add(optionsFromKeyval(t, m)); err != nil {
			t.Fatal(err)
		}
	}
	plain, err := s.GetUTF8("sec0")
	if err != nil {
		t.Fatal(err)
	}

	img := filepath.Join(dir, "img.luks")
	run := func(args ...string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, qemuImg, args...).CombinedOutput()
		// QEMU times its PBKDF2 iteration count with getrusage and, on a
		// loaded machine, can give up before writing anything.
		for try := 0; err != nil && try < testutil.PeerRetries && testutil.PeerFlake(string(out)); try++ {
			out, err = exec.CommandContext(ctx, qemuImg, args...).CombinedOutput()
		}
		if err != nil {
			t.Fatalf("qemu-img %q: %v\n%s", args, err, out)
		}
	}
	run("create", "--object", master, "--object", enc, "-f", "luks",
		"-o", "key-secret=sec0,iter-time=100", img, "1M")
	pwFile := filepath.Join(dir, "pw")
	if err := os.WriteFile(pwFile, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	run("info", "--object", "secret,id=p,format=raw,file="+pwFile,
		"--image-opts", "driver=luks,key-secret=p,file.filename="+img)
}
