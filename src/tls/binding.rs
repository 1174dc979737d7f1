//! SCRAM channel binding to a certificate: the `tls-server-end-point` data of RFC 5929 §4.1,
//! computed as PostgreSQL and libpq compute it, from the few DER fields it needs.

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// The `tls-server-end-point` channel binding of a DER certificate: its hash under the hash its
/// own signature uses (for RSA-PSS, the one its parameters name), SHA-256 in place of MD5 and
/// SHA-1 — what libpq computes from the certificate it was shown. `None` for a signature
/// without a hash of its own (Ed25519: PostgreSQL cannot bind to one either) or a certificate
/// that does not parse.
pub fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, ... }
    let (0x30, certificate, _) = der(cert)? else {
        return None;
    };
    let (0x30, _tbs, rest) = der(certificate)? else {
        return None;
    };
    let (0x30, algorithm, _) = der(rest)? else {
        return None;
    };
    let (0x06, oid, parameters) = der(algorithm)? else {
        return None;
    };
    Some(match signature_hash(oid, parameters)? {
        Hash::Sha224 => Sha224::digest(cert).to_vec(),
        Hash::Sha256 => Sha256::digest(cert).to_vec(),
        Hash::Sha384 => Sha384::digest(cert).to_vec(),
        Hash::Sha512 => Sha512::digest(cert).to_vec(),
    })
}

enum Hash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// 1.2.840.113549.1.1.x: PKCS #1 signatures.
const PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
/// 1.2.840.10045.4.x: ECDSA signatures.
const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
/// 2.16.840.1.101.3.4.2.x: the SHA-2 hashes.
const SHA2: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02];
/// 1.3.14.3.2.26: SHA-1.
const SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];

/// The hash to bind with for the signature algorithm `oid` with its DER `parameters`.
fn signature_hash(oid: &[u8], parameters: &[u8]) -> Option<Hash> {
    Some(match (oid.strip_prefix(PKCS1), oid.strip_prefix(ECDSA)) {
        // md5WithRSA, sha1WithRSA, sha256WithRSA; ecdsa-with-SHA1, ecdsa-with-SHA256
        (Some([4 | 5 | 11]), _) | (_, Some([1] | [3, 2])) => Hash::Sha256,
        (Some([14]), _) | (_, Some([3, 1])) => Hash::Sha224,
        (Some([12]), _) | (_, Some([3, 3])) => Hash::Sha384,
        (Some([13]), _) | (_, Some([3, 4])) => Hash::Sha512,
        // RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier DEFAULT sha1, .. }
        (Some([10]), _) => {
            let (0x30, pss, _) = der(parameters)? else {
                return None;
            };
            match der(pss) {
                Some((0xa0, hash, _)) => {
                    let (0x30, hash, _) = der(hash)? else {
                        return None;
                    };
                    let (0x06, hash, _) = der(hash)? else {
                        return None;
                    };
                    match (hash.strip_prefix(SHA2), hash == SHA1) {
                        (_, true) | (Some([1]), _) => Hash::Sha256,
                        (Some([2]), _) => Hash::Sha384,
                        (Some([3]), _) => Hash::Sha512,
                        (Some([4]), _) => Hash::Sha224,
                        _ => return None,
                    }
                }
                // No hashAlgorithm: SHA-1, bound with SHA-256.
                _ => Hash::Sha256,
            }
        }
        _ => return None,
    })
}

/// The DER element at the start of `b`: its tag, its contents and what follows it.
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (usize::from(first), b)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |a, &x| a << 8 | usize::from(x));
        (len, &b[n..])
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// One DER element (short lengths only).
    fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
        [&[tag, contents.len() as u8][..], contents].concat()
    }

    /// A certificate's outline: an empty to-be-signed part and the signature algorithm `oid`
    /// with its DER `parameters`.
    fn outline(oid: &[u8], parameters: &[u8]) -> Vec<u8> {
        let alg = tlv(0x30, &[tlv(0x06, oid), parameters.to_vec()].concat());
        tlv(0x30, &[tlv(0x30, &[]), alg].concat())
    }

    #[test]
    fn end_point_hashes_the_certificate_with_its_signatures_hash() {
        let p256 = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            server_end_point(&p256),
            Some(Sha256::digest(&p256).to_vec())
        );
        let p384 = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            server_end_point(&p384),
            Some(Sha384::digest(&p384).to_vec())
        );
        // Ed25519 names no hash: nothing to bind to (PostgreSQL cannot either).
        assert_eq!(server_end_point(&cert(&rcgen::PKCS_ED25519)), None);
        // RSA: SHA-1 is replaced by SHA-256 (RFC 5929), SHA-512 kept.
        let pkcs1 = |last: u8, parameters: &[u8]| outline(&[PKCS1, &[last]].concat(), parameters);
        let null = tlv(0x05, &[]);
        let sha1 = pkcs1(5, &null);
        assert_eq!(
            server_end_point(&sha1),
            Some(Sha256::digest(&sha1).to_vec())
        );
        let sha512 = pkcs1(13, &null);
        assert_eq!(
            server_end_point(&sha512),
            Some(Sha512::digest(&sha512).to_vec())
        );
        // RSA-PSS: the hash its parameters name; SHA-1 (named or by default) becomes SHA-256.
        let pss = |hash: Option<&[u8]>| {
            let named = hash.map(|h| tlv(0xa0, &tlv(0x30, &[tlv(0x06, h), null.clone()].concat())));
            pkcs1(10, &tlv(0x30, &named.unwrap_or_default()))
        };
        let pss384 = pss(Some(&[SHA2, &[2]].concat()));
        assert_eq!(
            server_end_point(&pss384),
            Some(Sha384::digest(&pss384).to_vec())
        );
        for sha1 in [pss(Some(SHA1)), pss(None)] {
            assert_eq!(
                server_end_point(&sha1),
                Some(Sha256::digest(&sha1).to_vec())
            );
        }
        assert_eq!(server_end_point(&pss(Some(&[0x2a, 0x03]))), None);
        assert_eq!(server_end_point(&pkcs1(10, &[])), None);
        for broken in [
            &b""[..],
            &[0x30],
            &[0x30, 0x05, 0x30],
            &sha1[..sha1.len() - 1],
        ] {
            assert_eq!(server_end_point(broken), None);
        }
    }
}
