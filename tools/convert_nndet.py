"""Convert an nnDetection raw dataset (imagesTr, labelsTr, dataset.json|yaml) into a MONAI detection datalist.

    python tools/convert_nndet.py --raw_dir /data/Task016_Luna --output_path /data/Task016_Luna/datalist.json \\
        [--validation_fraction 0.2 --seed 0]

Boxes are computed from the instance masks (world cccwhd mm); paths are relative to the datalist's folder.
"""

import fire

from meddet.data.nndet import convert_nndet_raw


def main(raw_dir: str, output_path: str, validation_fraction: float = 0.2, seed: int = 0) -> str:
    """Write the datalist and print a one-line summary; returns output_path."""
    datalist = convert_nndet_raw(raw_dir, output_path, validation_fraction=validation_fraction, seed=seed)
    counts = ", ".join(f"{len(items)} {key}" for key, items in datalist.items())
    print(f"wrote {output_path}: {counts}")
    return output_path


if __name__ == "__main__":
    fire.Fire(main)
