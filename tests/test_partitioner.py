"""Keys land where the Java client would put them: service.kafka.murmur2 and partition_for_key.

Three references: Kafka's own murmur2 test vectors, the Java client itself (the
kafka-clients jar that scripts/kafka.sh runs the broker with) on random keys, and
aiokafka's port of the function.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from conftest import ROOT

from service.kafka import canonical_partition, murmur2, partition_for_key

# apache/kafka clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java,
# testMurmur2: Utils.murmur2 of each key, as the Java int it returns.
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}
# BuiltInPartitioner.partitionForKey: toPositive(murmur2(key)) % numPartitions, i.e.
# (value & 0x7fffffff) % n of the ints above, for 3 and 12 partitions.
KAFKA_PARTITIONS = {
    b"21": (0, 0),
    b"foobar": (0, 6),
    b"a-little-bit-long-string": (2, 8),
    b"a-little-bit-longer-string": (2, 11),
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": (2, 5),
    b"abc": (0, 3),
}


def _signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


@pytest.mark.parametrize("key", sorted(KAFKA_VECTORS))
def test_kafka_vectors(key: bytes) -> None:
    assert _signed(murmur2(key)) == KAFKA_VECTORS[key]
    assert (partition_for_key(key, 3), partition_for_key(key, 12)) == KAFKA_PARTITIONS[key]
    for n in (3, 12):
        assert partition_for_key(key, n) == (KAFKA_VECTORS[key] & 0x7FFFFFFF) % n


def _random_keys(count: int) -> list[bytes]:
    rng = random.Random(20261128)
    keys = [rng.randbytes(rng.randrange(0, 80)) for _ in range(count)]
    keys += [f"{n:07d}".encode() for n in range(0, 10_000_000, 99_991)]  # the simulator's IDs
    keys += [str(rng.getrandbits(128)).encode() for _ in range(50)]
    keys += ["authorizer-ü-ß-€-𝄞".encode(), b"", b"\xff" * 300]
    return keys


def test_same_as_aiokafka_on_random_keys() -> None:
    for key in _random_keys(5000):
        assert murmur2(key) == aiokafka_murmur2(key), key


def test_canonical_partition_is_the_default_partitioners() -> None:
    for n in range(1, 40):
        assert canonical_partition("batch-21", n) == partition_for_key(b"batch-21", n)


def _java_classpath() -> str | None:
    if shutil.which("java") is None:
        return None
    run = subprocess.run(
        [str(ROOT / "scripts" / "kafka.sh"), "classpath"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    path = Path(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None
    return path.read_text().strip() if path and path.is_file() else None


def test_same_as_the_java_client() -> None:
    """Utils.murmur2 and BuiltInPartitioner.partitionForKey of the kafka-clients jar."""
    classpath = _java_classpath()
    if classpath is None:
        pytest.skip("no java or no kafka-clients jar (scripts/kafka.sh classpath)")
    rng = random.Random(7)
    cases = [(key, rng.choice((1, 2, 3, 7, 12, 50, 1000))) for key in _random_keys(2000)]
    cases += [(key, n) for key in KAFKA_VECTORS for n in (3, 12)]
    run = subprocess.run(
        ["java", "-cp", classpath, str(ROOT / "tests" / "fixtures" / "PartitionForKey.java")],
        input="".join(f"{key.hex()} {n}\n" for key, n in cases),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    java = [tuple(int(v) for v in line.split()) for line in run.stdout.splitlines()]
    assert len(java) == len(cases)
    for (key, n), (java_hash, java_partition) in zip(cases, java, strict=True):
        assert (_signed(murmur2(key)), partition_for_key(key, n)) == (java_hash, java_partition), (
            key,
            n,
        )
