"""The big-integer masker gives the same bytes as Autobahn's own, in any chunking."""

from __future__ import annotations

import os
import random

from autobahn.websocket.xormasker import create_xor_masker as autobahn_masker
from twisted.trial import unittest

from allspark.wsmask import XorMasker


class XorMaskerTests(unittest.TestCase):
    def test_matches_autobahn_for_many_lengths_and_chunkings(self) -> None:
        rng = random.Random(7)
        for length in list(range(0, 40)) + [125, 126, 127, 128, 1000, 65536]:
            mask = os.urandom(4)
            data = os.urandom(length)
            expected = autobahn_masker(mask, length).process(data) if length else b""
            masker = XorMasker(mask, length)
            out, i = [], 0
            while i < length:
                step = rng.randint(1, 9)
                out.append(masker.process(data[i:i + step]))
                i += step
            self.assertEqual(b"".join(out), expected, length)
            self.assertEqual(masker.pointer(), length)

    def test_masking_twice_restores_the_data(self) -> None:
        data = b'{"dest_id": "bob", "payload": "hi"}'
        masked = XorMasker(b"abcd").process(data)
        self.assertNotEqual(masked, data)
        self.assertEqual(XorMasker(b"abcd").process(masked), data)

    def test_reset_and_bad_mask(self) -> None:
        masker = XorMasker(b"\x01\x02\x03\x04")
        masker.process(b"xyz")
        masker.reset()
        self.assertEqual(masker.pointer(), 0)
        with self.assertRaises(ValueError):
            XorMasker(b"abc")
