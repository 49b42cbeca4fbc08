//! Does distillation help? Hinton et al.'s MNIST experiment on real digits.
//!
//! A teacher MLP (784-1200-1200-10, dropout) is trained on hard labels; then the same small
//! student (784-128-10) is trained twice from the same initialisation, data order, optimiser and
//! epochs: once on hard labels only, once with `DistillLoss` (soft + hard). Only the loss
//! differs. Repeated over seeds; test errors, a summary table, JSON and an SVG plot.
//!
//! ```sh
//! cargo run --release --example mnist                           # the bundled 10,000 digits
//! cargo run --release --example mnist -- --temperatures 1,2,4,8,16 --plot mnist.svg
//! cargo run --release --example mnist -- --data-dir ~/mnist     # the full 60k/10k MNIST
//! cargo run --release --example mnist -- --seeds 1              # one seed: about a minute
//! ```
//!
//! On Flex (the default) or, with `--features wgpu`, on wgpu.
use std::path::PathBuf;

use clap::Parser;

mod experiment;
use experiment::{Results, Settings, mean_std};

#[derive(Parser, Debug)]
#[command(about = "Knowledge distillation on MNIST: hard-label student vs distilled student")]
struct Args {
    /// Directory with MNIST IDX files (default: the bundled 10,000 digits).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Number of seeds (teacher and students retrained per seed).
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Distillation temperature of the main comparison.
    #[arg(long, default_value_t = 4.0)]
    temperature: f64,
    /// Temperature sweep, comma separated (e.g. 1,2,4,8,16); adds a plot point per value.
    #[arg(long, value_delimiter = ',')]
    temperatures: Vec<f64>,
    /// Weight of the soft term.
    #[arg(long, default_value_t = 0.9)]
    alpha: f64,
    /// Teacher hidden layers, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1200,1200")]
    teacher_hidden: Vec<usize>,
    /// Teacher epochs.
    #[arg(long, default_value_t = 15)]
    teacher_epochs: usize,
    /// Student hidden layers, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    student_hidden: Vec<usize>,
    /// Student epochs (both students).
    #[arg(long, default_value_t = 40)]
    student_epochs: usize,
    /// Use only the first N training digits.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Use only the first N test digits.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of test error against temperature.
    #[arg(long, default_value = "target/mnist_distill.svg")]
    plot: PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn summary(r: &Results) {
    println!(
        "\nMNIST: {} training digits, {} test digits; T = {}, α = {}\n",
        r.train_size, r.test_size, r.temperature, r.alpha
    );
    println!("| seed | teacher | student, hard labels | student, distilled |");
    println!("|---:|---:|---:|---:|");
    for i in 0..r.teacher_test_errors.len() {
        println!(
            "| {i} | {} | {} | {} |",
            r.teacher_test_errors[i], r.student_hard_test_errors[i], r.student_kd_test_errors[i]
        );
    }
    let pct =
        |(m, s): (f64, f64)| format!("{m:.1} ± {s:.1} ({:.2}%)", 100.0 * m / r.test_size as f64);
    let teacher = mean_std(&r.teacher_test_errors);
    let hard = mean_std(&r.student_hard_test_errors);
    let kd = mean_std(&r.student_kd_test_errors);
    println!(
        "| mean ± std | {} | {} | {} |",
        pct(teacher),
        pct(hard),
        pct(kd)
    );
    let gap = hard.0 - teacher.0;
    if gap > 0.0 {
        println!(
            "\nDistillation closed {:.0}% of the teacher–student gap ({:.1} of {:.1} test errors).",
            100.0 * (hard.0 - kd.0) / gap,
            hard.0 - kd.0,
            gap
        );
    } else {
        println!(
            "\nThe hard-label student is not worse than the teacher: there is no gap to close."
        );
    }
    if r.sweep.len() > 1 {
        println!("\n| temperature | distilled student test errors (mean ± std) |\n|---:|---:|");
        let mut sweep = r.sweep.clone();
        sweep.sort_by(|a, b| a.temperature.total_cmp(&b.temperature));
        for p in &sweep {
            println!(
                "| {} | {} |",
                p.temperature,
                pct(mean_std(&p.student_kd_test_errors))
            );
        }
    }
}

fn hidden_label(r: &Results) -> String {
    r.student_hidden
        .iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join("-")
}

fn plot(r: &Results, path: &PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let to_pct = |e: f64| 100.0 * e / r.test_size as f64;
    let mut points: Vec<(f64, f64)> = r
        .sweep
        .iter()
        .map(|p| (p.temperature, to_pct(mean_std(&p.student_kd_test_errors).0)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let hard = to_pct(mean_std(&r.student_hard_test_errors).0);
    let teacher = to_pct(mean_std(&r.teacher_test_errors).0);
    let (t_min, t_max) = (points[0].0 * 0.8, points[points.len() - 1].0 * 1.25);
    let all = points.iter().map(|p| p.1).chain([hard, teacher]);
    let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(a, b), y| (a.min(y), b.max(y)));

    let root = SVGBackend::new(path, (720, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "MNIST: test error of the 784-{}-10 student",
                hidden_label(r)
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((t_min..t_max).log_scale(), (lo * 0.9)..(hi * 1.1))?;
    chart
        .configure_mesh()
        .x_desc("distillation temperature T")
        .y_desc("test error (%)")
        .draw()?;
    chart
        .draw_series(LineSeries::new(points.clone(), &BLUE))?
        .label("distilled student")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
    chart
        .draw_series(LineSeries::new([(t_min, hard), (t_max, hard)], &RED))?
        .label("student, hard labels")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .draw_series(LineSeries::new(
            [(t_min, teacher), (t_max, teacher)],
            &BLACK,
        ))?
        .label("teacher")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    let args = Args::parse();
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(experiment::default_data_dir);
    let (mut train, mut test) = experiment::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    if let Some(n) = args.train_limit {
        train = train.take(n);
    }
    if let Some(n) = args.test_limit {
        test = test.take(n);
    }
    let settings = Settings {
        seeds: args.seeds,
        temperature: args.temperature,
        sweep: args.temperatures.clone(),
        alpha: args.alpha,
        teacher_hidden: args.teacher_hidden.clone(),
        teacher_epochs: args.teacher_epochs,
        student_hidden: args.student_hidden.clone(),
        student_epochs: args.student_epochs,
        progress: !args.quiet,
        ..Settings::default()
    };
    let start = std::time::Instant::now();
    let results = run(&train, &test, &settings);
    summary(&results);
    println!("\n(total time {:.0} s)", start.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results).unwrap())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("results written to {}", path.display());
    }
    match plot(&results, &args.plot) {
        Ok(()) => println!("plot written to {}", args.plot.display()),
        Err(e) => eprintln!("could not draw the plot: {e}"),
    }
}

/// The experiment on wgpu (`--features wgpu`), else on Flex (the default).
fn run(train: &experiment::Digits, test: &experiment::Digits, settings: &Settings) -> Results {
    #[cfg(feature = "wgpu")]
    let device = burn::tensor::Device::wgpu(Default::default());
    #[cfg(not(feature = "wgpu"))]
    let device = burn::tensor::Device::flex();
    experiment::run(train, test, settings, &device)
}
