rule tables:
    input:
        refusal=evaluations("refusal.json"),
        capability=evaluations("capability.json"),
        visage=published_visage(),
    output:
        # each cell's mean and sd over seeds, where an attack has several (one seed: the command as before)
        **{
            name: report(
                path,
                caption="../report/refusal_seeds.rst",
                category="Tables",
                subcategory="Refusal and capability",
            )
            for name, path in seeds_table().items()
        },
        # each worst case's mean and sd over a defence's seeds, where a defence trains under several
        **{
            name: report(
                path,
                caption="../report/defence_seeds.rst",
                category="Tables",
                subcategory="Refusal and capability",
            )
            for name, path in defence_seeds_table().items()
        },
        refusal=report(
            "results/tables/refusal.csv",
            caption="../report/refusal.rst",
            category="Tables",
            subcategory="Refusal and capability",
        ),
        summary=report(
            "results/tables/refusal_summary.csv",
            caption="../report/refusal_summary.rst",
            category="Tables",
            subcategory="Refusal and capability",
        ),
        figures=report(
            directory("results/figures/refusal"),
            patterns=["{name}.png"],
            caption="../report/heatmaps.rst",
            category="Figures",
            subcategory="Attack grids",
        ),
        harmfulness=report(
            "results/tables/harmfulness.csv",
            caption="../report/harmfulness.rst",
            category="Tables",
            subcategory="Paper tables",
        ),
        tamper_resistance=report(
            "results/tables/tamper_resistance.csv",
            caption="../report/tamper_resistance.rst",
            category="Tables",
            subcategory="Paper tables",
        ),
        published=report(
            "results/tables/published.csv",
            caption="../report/published.rst",
            category="Tables",
            subcategory="Paper tables",
        ),
        cost=report(
            "results/tables/defence_cost.csv",
            caption="../report/defence_cost.rst",
            category="Tables",
            subcategory="Refusal and capability",
        ),
        manifest="results/tables/refusal.manifest.json",
    log:
        "logs/tables.log",
    conda:
        "../../envs/tamperlab.yaml"
    params:
        numerics=NUMERICS,
        tables=tables_params(),
        visage=lambda wildcards, input: (
            f" --visage {input.visage}" if input.visage else ""
        ),
        seeds=lambda wildcards, output: (
            f" --out-seeds {output.seeds}" if "seeds" in output.keys() else ""
        )
        + (
            f" --out-defence-seeds {output.defence_seeds}"
            if "defence_seeds" in output.keys()
            else ""
        ),
    shell:
        "tamperlab {params.numerics} tables --refusal {input.refusal} --capability {input.capability}"
        " {params.tables} --out-refusal {output.refusal}"
        " --out-summary {output.summary} --out-figures {output.figures}"
        " --out-harmfulness {output.harmfulness}"
        " --out-tamper-resistance {output.tamper_resistance}"
        " --out-published {output.published} --out-cost {output.cost}{params.visage}{params.seeds} > {log} 2>&1"
