package luks_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/xts"

	"blockd/drivers/file"
	"blockd/drivers/luks"
	"blockd/drivers/raw"
	"blockd/graph"
	"blockd/internal/testutil"
	"blockd/secrets"
)

func newGraph(t *testing.T, pass string) *graph.Graph {
	st := &secrets.Store{}
	if err := st.Add(secrets.Options{ID: "sec0", Data: &pass}); err != nil {
		t.Fatal(err)
	}
	wrong := "not the passphrase"
	if err := st.Add(secrets.Options{ID: "bad", Data: &wrong}); err != nil {
		t.Fatal(err)
	}
	return graph.New(st, file.Driver(), raw.Driver(), luks.Driver())
}

func add(t *testing.T, g *graph.Graph, js string) {
	t.Helper()
	if _, err := g.Add(context.Background(), testutil.Tree(t, js), false); err != nil {
		t.Fatalf("blockdev-add %s: %v", js, err)
	}
}

func backend(t *testing.T, g *graph.Graph, name string, write bool) *graph.Child {
	t.Helper()
	perm := graph.PermRead
	if write {
		perm |= graph.PermWrite
	}
	c, err := g.NewBackend(name, "test", perm, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.ReleaseBackend(c) })
	return c
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i*7) ^ seed ^ byte(i>>12)
	}
	return p
}

// volumeKey asks cryptsetup for the volume key: the independent check of
// what blockd wrote.
func volumeKey(t *testing.T, hdr, passFile string) []byte {
	t.Helper()
	vk := filepath.Join(t.TempDir(), "vk")
	testutil.Run(t, "cryptsetup", "luksDump", "-q", "--dump-volume-key", "--volume-key-file", vk, "--key-file", passFile, hdr)
	key, err := os.ReadFile(vk)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// xtsDecrypt decrypts an aes-xts-plain64 payload with golang.org/x/crypto,
// not blockd's cipher code.
func xtsDecrypt(t *testing.T, key, ct []byte, sectorSize int) []byte {
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(ct))
	for i := 0; i < len(ct); i += sectorSize {
		c.Decrypt(out[i:i+sectorSize], ct[i:i+sectorSize], uint64(i/512))
	}
	return out
}

// TestCryptsetupDetachedLUKS2 encrypts data in place with cryptsetup
// (detached header) and reads it back through blockd.
func TestCryptsetupDetachedLUKS2(t *testing.T) {
	for _, ss := range []int{512, 4096} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			dir := t.TempDir()
			data, hdr, pw := filepath.Join(dir, "data"), filepath.Join(dir, "hdr"), filepath.Join(dir, "pw")
			plain := pattern(1<<20, 1)
			os.WriteFile(data, plain, 0o600)
			os.WriteFile(pw, []byte("s3cret pass"), 0o600)
			testutil.Run(t, "cryptsetup", "reencrypt", "-q", "--encrypt", "--type", "luks2", "--header", hdr,
				"--sector-size", fmt.Sprint(ss), "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pw, data)
			g := newGraph(t, "s3cret pass")
			add(t, g, fmt.Sprintf(`{"driver":"luks","node-name":"disk","key-secret":"sec0","file":{"driver":"file","filename":%q},"header":{"driver":"file","filename":%q}}`, data, hdr))
			c := backend(t, g, "disk", true)
			if c.Size() != int64(len(plain)) {
				t.Fatalf("size %d, want %d", c.Size(), len(plain))
			}
			got := make([]byte, len(plain))
			if err := c.ReadAt(context.Background(), got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatal("payload read through blockd differs from what cryptsetup encrypted")
			}
			// Unaligned write through the graph's read-modify-write, checked
			// by an independent decryptor with cryptsetup's volume key.
			msg := []byte("written by blockd across a sector boundary")
			if err := c.WriteAt(context.Background(), msg, int64(ss)-7, graph.FUA); err != nil {
				t.Fatal(err)
			}
			copy(plain[ss-7:], msg)
			ct, _ := os.ReadFile(data)
			if !bytes.Equal(xtsDecrypt(t, volumeKey(t, hdr, pw), ct, ss), plain) {
				t.Fatal("ciphertext written by blockd does not decrypt with cryptsetup's key")
			}
		})
	}
}

// TestCreateAndPeers creates LUKS1 and LUKS2 images (embedded and detached)
// with blockdev-create and checks them with cryptsetup and qemu-img.
func TestCreateAndPeers(t *testing.T) {
	for _, tc := range []struct {
		name     string
		version  int
		detached bool
		extra    string
	}{
		{"luks1-embedded", 1, false, `"iter-time":10`},
		{"luks1-detached", 1, true, `"iter-time":10`},
		{"luks2-embedded-argon2id", 2, false, `"iter-time":10,"pbkdf":"argon2id"`},
		{"luks2-detached-4k", 2, true, `"iter-time":10,"pbkdf":"pbkdf2","sector-size":4096`},
		{"luks1-cbc-essiv", 1, false, `"iter-time":10,"cipher-alg":"aes-128","cipher-mode":"cbc","ivgen-alg":"essiv","ivgen-hash-alg":"sha256"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			data, hdr, pw := filepath.Join(dir, "data"), filepath.Join(dir, "hdr"), filepath.Join(dir, "pw")
			os.WriteFile(pw, []byte("pass word"), 0o600)
			os.WriteFile(data, nil, 0o600)
			os.WriteFile(hdr, nil, 0o600)
			g := newGraph(t, "pass word")
			add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"data","filename":%q}`, data))
			add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"hdr","filename":%q}`, hdr))
			opts := fmt.Sprintf(`{"driver":"luks","file":"data","size":4194304,"key-secret":"sec0","luks-version":%d,%s`, tc.version, tc.extra)
			if tc.detached {
				opts += `,"header":"hdr"`
			}
			drv, o, err := g.DecodeCreateOptions(testutil.Tree(t, opts+"}"))
			if err != nil {
				t.Fatal(err)
			}
			cc := g.NewCreateContext()
			if err := drv.Create(ctx, cc, o); err != nil {
				t.Fatal(err)
			}
			cc.Release()
			hdrFile := data
			node := `{"driver":"luks","node-name":"disk","key-secret":"sec0","file":"data"`
			if tc.detached {
				hdrFile = hdr
				node += `,"header":"hdr"`
			}
			dump := testutil.Run(t, "cryptsetup", "luksDump", hdrFile)
			if !strings.Contains(dump, fmt.Sprintf("Version:       \t%d", tc.version)) {
				t.Fatalf("luksDump:\n%s", dump)
			}
			testutil.Run(t, "cryptsetup", "open", "--test-passphrase", "--key-file", pw, hdrFile)
			add(t, g, node+"}")
			c := backend(t, g, "disk", true)
			if c.Size() != 4<<20 {
				t.Fatalf("virtual size %d", c.Size())
			}
			plain := pattern(4<<20, 9)
			if err := c.WriteAt(ctx, plain, 0, 0); err != nil {
				t.Fatal(err)
			}
			if err := c.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(plain))
			if err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("read back: %v", err)
			}
			if tc.name == "luks1-embedded" || tc.name == "luks1-cbc-essiv" {
				// QEMU 7.2 reads embedded LUKS1: compare the plaintext.
				plainFile := filepath.Join(dir, "plain")
				os.WriteFile(plainFile, plain, 0o600)
				testutil.Run(t, "qemu-img", "compare", "--object", "secret,id=s0,file="+pw,
					"--image-opts", "driver=luks,key-secret=s0,file.filename="+data, "driver=raw,file.filename="+plainFile)
			}
			if strings.HasPrefix(tc.extra, `"iter-time":10,"pbkdf":"pbkdf2","sector-size"`) || tc.name == "luks1-detached" {
				off := int64(0)
				ct, _ := os.ReadFile(data)
				ss := 512
				if strings.Contains(tc.extra, "4096") {
					ss = 4096
				}
				if !bytes.Equal(xtsDecrypt(t, volumeKey(t, hdrFile, pw), ct[off:], ss), plain) {
					t.Fatal("payload does not decrypt with cryptsetup's volume key")
				}
			}
		})
	}
}

// TestSharedHeader opens two luks nodes on two data devices with one header
// node, writes both in parallel and checks both.
func TestSharedHeader(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	hdr := filepath.Join(dir, "hdr")
	os.WriteFile(hdr, nil, 0o600)
	g := newGraph(t, "shared")
	add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"hdr","filename":%q}`, hdr))
	drv, o, err := g.DecodeCreateOptions(testutil.Tree(t, `{"driver":"luks","header":"hdr","size":0,"key-secret":"sec0","iter-time":10,"luks-version":2,"pbkdf":"pbkdf2"}`))
	if err != nil {
		t.Fatal(err)
	}
	cc := g.NewCreateContext()
	if err := drv.Create(ctx, cc, o); err != nil {
		t.Fatal(err)
	}
	cc.Release()
	var cs []*graph.Child
	for i := 0; i < 2; i++ {
		d := filepath.Join(dir, fmt.Sprintf("d%d", i))
		os.WriteFile(d, make([]byte, 1<<20), 0o600)
		add(t, g, fmt.Sprintf(`{"driver":"luks","node-name":"disk%d","key-secret":"sec0","header":"hdr","file":{"driver":"file","filename":%q}}`, i, d))
		cs = append(cs, backend(t, g, fmt.Sprintf("disk%d", i), true))
	}
	var wg sync.WaitGroup
	for i, c := range cs {
		wg.Add(1)
		go func(i int, c *graph.Child) {
			defer wg.Done()
			if err := c.WriteAt(ctx, pattern(1<<20, byte(i)), 0, 0); err != nil {
				t.Error(err)
			}
		}(i, c)
	}
	wg.Wait()
	for i, c := range cs {
		got := make([]byte, 1<<20)
		if err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, pattern(1<<20, byte(i))) {
			t.Fatalf("disk%d: %v", i, err)
		}
	}
	if err := g.Del("hdr"); err == nil || err.Error() != "Block device hdr is in use" {
		t.Fatalf("deleting a shared header in use: %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk")
	b := make([]byte, 1<<20)
	rand.Read(b)
	os.WriteFile(junk, b, 0o600)
	g := newGraph(t, "x")
	for _, tc := range []struct{ js, want string }{
		{fmt.Sprintf(`{"driver":"luks","node-name":"a","file":{"driver":"file","filename":%q}}`, junk), "Parameter 'key-secret' is required for cipher"},
		{fmt.Sprintf(`{"driver":"luks","node-name":"a","key-secret":"sec0","file":{"driver":"file","filename":%q}}`, junk), "not a luks header"},
		{fmt.Sprintf(`{"driver":"luks","node-name":"a","key-secret":"nosuch","file":{"driver":"file","filename":%q}}`, junk), "not a luks header"},
	} {
		_, err := g.Add(context.Background(), testutil.Tree(t, tc.js), false)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.js, err, tc.want)
		}
	}
	// A wrong passphrase gives QEMU's text.
	hdr := filepath.Join(dir, "h")
	os.WriteFile(hdr, nil, 0o600)
	add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"h","filename":%q}`, hdr))
	drv, o, err := g.DecodeCreateOptions(testutil.Tree(t, `{"driver":"luks","header":"h","size":0,"key-secret":"sec0","iter-time":10}`))
	if err != nil {
		t.Fatal(err)
	}
	cc := g.NewCreateContext()
	if err := drv.Create(context.Background(), cc, o); err != nil {
		t.Fatal(err)
	}
	cc.Release()
	_, err = g.Add(context.Background(), testutil.Tree(t, fmt.Sprintf(`{"driver":"luks","node-name":"a","key-secret":"bad","header":"h","file":{"driver":"file","filename":%q}}`, junk)), false)
	if err == nil || err.Error() != "Invalid password, cannot unlock any keyslot" {
		t.Fatalf("wrong passphrase: %v", err)
	}
	if n := len(g.Nodes()); n != 1 {
		t.Fatalf("failed opens left %d nodes", n)
	}
}
