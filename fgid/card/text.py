"""The dataset card's Markdown: what a face dataset's card must say, filled from summary.json."""

from __future__ import annotations

from fgid.card.plots import PLOTS, identity_size_bins, identity_stats, regions_present
from fgid.card.settings import SETTINGS_FILE, CardSettings
from fgid.report import md_table, summary_table
from fgid.schema import IDENTITY_SCHEMA, INDEX_SCHEMA, PARSING_CLASSES, REASONS, SAMPLE_FIELDS

TODO = "**To be filled in by the publisher**"
CITATION = """```bibtex
@article{huang2024consistentid,
  title   = {ConsistentID: Portrait Generation with Multimodal Fine-Grained Identity Preserving},
  author  = {Huang, Jiehui and Dong, Xiao and Song, Wenhui and Li, Hanhui and Zhou, Jun and
             Cheng, Yuhao and Liao, Shutao and Chen, Long and Yan, Yiqiang and Liao, Shengcai
             and others},
  journal = {arXiv preprint arXiv:2404.16771},
  year    = {2024}
}

@article{liu2025faceclip,
  title   = {Learning Joint ID-Textual Representation for ID-Preserving Image Synthesis},
  author  = {Liu, Zichuan and Jiang, Liming and Yan, Qing and Jia, Yumin and Kang, Hao and
             Lu, Xin},
  journal = {arXiv preprint arXiv:2504.14202},
  year    = {2025}
}
```"""


def left_table(header: tuple[str, str], items: list[tuple[object, object]]) -> str:
    """A two-column table of text (md_table right-aligns its numbers column)."""
    return md_table(header, items).replace("|---|---:|", "|---|---|", 1)


def _or_todo(text: str, what: str) -> str:
    return text or f"{TODO} ({what}; set it in `{SETTINGS_FILE}` and rerun the build)."


def summary_section(summary: dict, joint: dict, build: dict, settings: CardSettings) -> str:
    age, ids = summary["age"], summary["identities"]
    stats = identity_stats(ids["images_per_identity"])
    rows = [(r["metric"], r["value"]) for r in summary_table(summary)]
    per_identity = f"{stats['mean']} / {stats['median']} / {stats['max']}"
    rows += [
        ("identities from source labels", ids["from_labels"]),
        ("images per identity: mean / median / max", per_identity),
        ("mean / median age (estimated)", f"{age['mean']} / {age['median']}"),
        *((f"gender: {g}", n) for g, n in summary["gender"].items()),
        ("embedding dimension", summary["embedding_dim"]),
    ]  # fmt: skip
    incomplete = (
        "" if summary["complete"] else "**Incomplete: some shards are not done; rerun the build.**"
    )
    return "\n\n".join(
        p
        for p in [
            "## Dataset summary",
            incomplete,
            f"An FGID-style face dataset (the data format of ConsistentID, also used to train "
            f"FaceCLIP): aligned face crops with face-parsing label maps, identity embeddings, "
            f"estimated age and gender, and two captions each, in webdataset shards. Built with "
            f"the `{build.get('models', '?')}` model set (config hash `{summary['config_hash']}`). "
            "Every annotation is a model's output, not ground truth.",
            "### Key numbers",
            md_table(("metric", "value"), rows),
            "How fast it was built: [build report](build_report.md).",
        ]
        if p
    )


def samples_section(grid: str | None, settings: CardSettings) -> str:
    if grid is None:
        why = (
            f"left out (`sample_faces: 0` in `{SETTINGS_FILE}`)"
            if not settings.sample_faces
            else "none: the dataset has no kept samples"
        )
        return f"## Sample faces\n\nSample faces: {why}."
    return (
        "## Sample faces\n\n"
        f"![Sample faces]({grid})\n\n"
        "Each tile: the aligned face, its parsing label map blended over it (colours are the "
        "CelebAMask-HQ classes in the legend), and the start of its caption. The first sample "
        f"of each identity, in dataset order. Set `sample_faces: 0` in `{SETTINGS_FILE}` to "
        "publish the card without faces."
    )


def structure_section() -> str:
    members = left_table(
        ("member", "content"), [(f"`{{key}}.{k}`", v) for k, v in SAMPLE_FIELDS.items()]
    )
    index = left_table(("column", "type"), [(f"`{f.name}`", f"`{f.type}`") for f in INDEX_SCHEMA])
    identity = left_table(
        ("column", "type"), [(f"`{f.name}`", f"`{f.type}`") for f in IDENTITY_SCHEMA]
    )
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(PARSING_CLASSES))
    return "\n\n".join(
        [
            "## Structure",
            "Files: `shards/NNNNN.tar` (webdataset shards of kept samples), `shards/NNNNN.parquet` "
            "(one index row per input, kept or rejected), `identities.parquet` (identity and "
            "duplicate flags per kept sample), `summary.json` (the numbers in this card).",
            "To publish on the Hugging Face Hub, upload the contents of `card/` as the "
            "repository root and `shards/` beside them: the header's `data_files` points at "
            "`shards/*.tar`, and the Hub reads webdataset shards as they are.",
            "### Sample members",
            members,
            "### Index columns (`shards/*.parquet`)",
            index,
            "### Identity columns (`identities.parquet`)",
            identity,
            f"Label map classes: {classes}.",
            "```python\nimport glob, webdataset as wds\n\n"
            'ds = wds.WebDataset(sorted(glob.glob("shards/*.tar")), shardshuffle=False)'
            '.decode("rgb8")\n```',
        ]
    )


def governance_sections(summary: dict, settings: CardSettings, models: dict) -> str:
    licence = settings.license_name or settings.license
    if settings.license_link:
        licence = f"[{licence}]({settings.license_link})"
    model_rows = left_table(("role", "model"), sorted(models.items())) if models else ""
    return "\n\n".join(
        p
        for p in [
            "## Sources",
            _or_todo(settings.sources, "where the photos came from, and on what terms"),
            f"{summary['inputs']['indexed']:,} input files were read; "
            f"{summary['identities']['from_labels']:,} identities come from the sources' own "
            "labels, the rest from clustering face embeddings. The annotations were made by:",
            model_rows,
            "## Consent",
            _or_todo(settings.consent, "how the people shown agreed to be in this dataset"),
            "Photos of people collected from the web were not, in general, taken or shared for "
            "training face models. Do not publish this dataset unless the people in it, or the "
            "terms their photos were shared under, allow it.",
            "## Licences",
            f"Dataset licence: **{licence}**."
            + (
                f" {TODO}: the licence of every source collection (set `license` in "
                f"`{SETTINGS_FILE}`); it cannot be more permissive than theirs."
                if settings.license in ("other", "unknown") and not settings.license_name
                else ""
            ),
            "The annotations are outputs of the models above, whose licences may restrict "
            "use: InsightFace's buffalo_l models are for non-commercial research only; "
            "LLaVA-1.5 follows the Llama 2 community licence; dlib's 68-point landmark model "
            "was trained on iBUG 300-W, whose licence excludes commercial use.",
            "## Personal and sensitive information",
            "Every sample is a photo of a real person's face (unless the source is synthetic). "
            "Faces, and above all the identity embeddings (`.id.npy`, the index's `embedding` "
            "column), are **biometric data**: special-category data under the GDPR (Art. 9) "
            "and biometric identifiers under laws such as Illinois' BIPA. Processing them "
            "needs a lawful basis, often explicit consent; some laws require written notice, "
            "a retention schedule and a ban on selling them. The index's `source` column and "
            "each sample's `.json` hold the original file path or URL, which may name a person; "
            "captions describe apparent age, gender and appearance. Keep access restricted to "
            "people who need it, and do not use the data to identify or track people.",
        ]
        if p
    )


def _bias_bullets(summary: dict) -> str:
    samples = summary["samples"] or 1
    gender = ", ".join(f"{g} {n / samples:.0%}" for g, n in summary["gender"].items()) or "none"
    hist = summary["age"]["histogram"]
    top = max(hist, key=hist.get) if any(hist.values()) else None
    ids = summary["identities"]
    single = int(ids["images_per_identity"].get("1", 0))
    return "\n".join(
        [
            f"- Estimated gender: {gender}. Estimated age: most samples in {top or 'no'} years "
            f"(mean {summary['age']['mean']}). Both are model estimates with known errors, "
            "larger for darker skin, for children and the old, and for faces not read as "
            "binary-gendered; treat them as a rough picture of the sample, never as a label.",
            f"- {single:,} of {ids['total']:,} identities have a single image; identities are "
            "clusters of face embeddings unless the source labelled them, so one person can be "
            "split into several identities, and look-alikes merged into one.",
            "- The detector misses small, turned, occluded and low-light faces (see the "
            "rejection reasons), so the dataset over-represents frontal, well-lit portraits.",
            "- Captions come from a vision-language model (or a template, marked as such) and "
            "repeat its biases: stereotyped descriptions of gender, age and ethnicity, and "
            "invented details.",
            "- Face parsing is least reliable on glasses, hats, heavy make-up and profile views.",
        ]
    )


def bias_section(summary: dict, joint: dict, images: dict[str, str]) -> str:
    genders = list(joint)
    age_rows = [
        (b, *(joint[g][b] for g in genders), n) for b, n in summary["age"]["histogram"].items()
    ]
    age_table = "\n".join(
        [
            "| years | " + " | ".join([*genders, "all"]) + " |",
            "|---|" + "---:|" * (len(genders) + 1),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in age_rows),
        ]
    )
    samples = summary["samples"] or 1
    bins = identity_size_bins(summary["identities"]["images_per_identity"])
    bodies = {
        "age_gender": age_table,
        "images_per_identity": "An identity is recognizable when it has two or more distinct "
        "images.\n\n" + md_table(("images", "identities"), list(bins.items())),
        "rejection_reasons": "\n".join(
            ["| reason | inputs | meaning |", "|---|---:|---|"]
            + [
                f"| {k} | {v} | {REASONS.get(k, '')} |"
                for k, v in summary["rejection_reasons"].items()
            ]
        ),
        "regions": md_table(
            ("region", "samples"),
            [(k, f"{v} ({v / samples:.0%})") for k, v in regions_present(summary).items()],
        ),
    }
    parts = ["## Bias and limitations", _bias_bullets(summary)]
    for stem, title in PLOTS.items():
        parts += [f"### {title}", f"![{title}]({images[stem]})", bodies[stem]]
    return "\n\n".join(parts)


def removal_section(settings: CardSettings) -> str:
    contact = settings.contact or "`<contact: set contact in card.yaml>`"
    return "\n\n".join(
        [
            "## How to request removal",
            f"Anyone shown in this dataset can ask to be removed: contact {contact} with the "
            "photo(s) concerned or their URLs. No reason is needed.",
            "The publisher removes them with:",
            "```bash\n"
            'fgid remove DATASET --sources takedown.txt --reason "ticket N"  '
            "# source paths or sha256 of the photos\n"
            'fgid remove DATASET --identity cluster-... --reason "ticket N"  '
            "# every image of one identity\n```",
            "The samples leave every shard, index and the summary; a record in `removals/` keeps "
            "only keys and content hashes, and rebuilding does not bring them back. Copies already "
            "published (the Hub, mirrors) must be re-uploaded.",
        ]
    )


def citation_section() -> str:
    return "## Citation\n\nThe data format and the models it trains come from:\n\n" + CITATION
