package blockcrypto

import (
	"crypto/cipher"
	"reflect"
	"unsafe"
)

// wipeBlock zeroes the memory of a cipher.Block made by crypto/aes, which
// holds the expanded round keys and offers no way to clear them. It only
// touches blocks whose dynamic type is a pointer to a struct without
// pointers (true of crypto/aes on every architecture but s390x), so clearing
// the bytes cannot corrupt anything the garbage collector tracks. Other
// blocks are left alone.
func wipeBlock(b cipher.Block) {
	v := reflect.ValueOf(b)
	if v.Kind() != reflect.Pointer || v.IsNil() || !pointerFree(v.Type().Elem()) {
		return
	}
	n := v.Type().Elem().Size()
	if n == 0 {
		return
	}
	clear(unsafe.Slice((*byte)(v.UnsafePointer()), n))
}

// pointerFree reports whether values of type t contain no pointers.
func pointerFree(t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr,
		reflect.Float32, reflect.Float64, reflect.Complex64, reflect.Complex128:
		return true
	case reflect.Array:
		return t.Len() == 0 || pointerFree(t.Elem())
	case reflect.Struct:
		for i := 0; i < t.NumField(); i++ {
			if !pointerFree(t.Field(i).Type) {
				return false
			}
		}
		return true
	}
	return false
}
