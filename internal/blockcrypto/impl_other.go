//go:build !amd64 || purego

package blockcrypto

func bestImpl() implKind { return implPortable }

// supportedImpls lists the implementations this CPU can run, best last.
func supportedImpls() []implKind { return []implKind{implPortable} }

func (c *Cipher) cryptAsm(dst, src []byte, first, step uint64, ss int, enc bool) {
	panic("blockcrypto: no assembly implementation on this platform")
}
