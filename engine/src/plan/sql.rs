//! Plans a table's SQL query (PostgreSQL dialect, parsed by `sqlparser`) into a [`Plan`].
//!
//! Supported: `SELECT` lists with expressions and aliases, `*`, `FROM` a source with inner and
//! left equi-joins (`ON a.x = b.y AND ...`), `WHERE`, `GROUP BY` with `count/sum/min/max/avg`,
//! `HAVING`. Anything else is an error that names the construct: nothing is silently ignored.
//! Errors carry the 1-based line and column inside the query text.

use sqlparser::ast;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::{join_key, AggFunc, Aggregate, BinaryOp, Expr, Func, JoinKind, Plan};
use crate::value::{Column, ColumnType, Value, F64};

/// What the planner knows about a source: its name, columns and key column.
#[derive(Clone, Copy, Debug)]
pub struct SourceSchema<'a> {
    /// Source name, as used in `FROM`.
    pub name: &'a str,
    /// Declared columns.
    pub columns: &'a [Column],
    /// Positions of the columns that identify a row (one, or a stream source's several).
    pub key: &'a [usize],
}

/// A planning error, positioned inside the query text (line and column are 1-based; 0 when the
/// parser gave no position).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    /// Line inside the query.
    pub line: usize,
    /// Column inside the query.
    pub col: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

/// A planned query: the operator tree, its output columns and primary key.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// The operator tree.
    pub plan: Plan,
    /// Output columns.
    pub columns: Vec<Column>,
    /// Key column positions in `columns`.
    pub key: Vec<usize>,
}

/// A column an expression may name, as `qualifier.name`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExprColumn {
    /// The qualifier (`command`, `entity`, `principal`).
    pub qualifier: String,
    /// The column name.
    pub name: String,
    /// Its type.
    pub ty: ColumnType,
}

/// Plans one scalar expression (a command rule or assignment) over `columns`: the planned
/// expression reads a row laid out as `columns`, and has the returned type (`None` for a bare
/// NULL).
pub fn plan_expression(
    sql: &str,
    columns: &[ExprColumn],
) -> Result<(Expr, Option<ColumnType>), PlanError> {
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect)
        .try_with_sql(sql)
        .map_err(parse_error)?;
    let expr = parser.parse_expr().map_err(parse_error)?;
    let rest = parser.peek_token();
    if rest.token != sqlparser::tokenizer::Token::EOF {
        return Err(err_at(
            rest.span.start.line as usize,
            rest.span.start.column as usize,
            &format!("unexpected `{}` after the expression", rest.token),
            Some("a rule is one SQL expression".into()),
        ));
    }
    if contains_aggregate(&expr) {
        return Err(err_span(&expr, "aggregates are not allowed here", None));
    }
    let scope: Vec<ScopeColumn> = columns
        .iter()
        .map(|c| ScopeColumn {
            qualifier: c.qualifier.clone(),
            name: c.name.clone(),
            ty: c.ty,
        })
        .collect();
    ExprPlanner::row(&scope).plan(&expr)
}

/// Plans `sql` against `sources`.
pub fn plan_query(sql: &str, sources: &[SourceSchema<'_>]) -> Result<Planned, PlanError> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(parse_error)?;
    let [ast::Statement::Query(query)] = statements.as_slice() else {
        return Err(err_at(
            1,
            1,
            "a table's query must be exactly one SELECT statement",
            None,
        ));
    };
    if query.with.is_some() {
        return Err(unsupported(
            query.as_ref(),
            "WITH (common table expressions)",
        ));
    }
    if query.order_by.is_some() {
        return Err(unsupported(
            query.as_ref(),
            "ORDER BY (a table has no order; sort when you read it)",
        ));
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return Err(unsupported(query.as_ref(), "LIMIT/OFFSET/FETCH"));
    }
    let ast::SetExpr::Select(select) = query.body.as_ref() else {
        return Err(unsupported(
            query.body.as_ref(),
            "set operations (UNION, INTERSECT, EXCEPT, VALUES)",
        ));
    };
    plan_select(select, sources)
}

struct ScopeColumn {
    qualifier: String,
    name: String,
    ty: ColumnType,
}

/// A planned relation: plan, the columns it exposes to expressions, and its key.
struct Rel {
    plan: Plan,
    scope: Vec<ScopeColumn>,
    key: Vec<usize>,
}

fn plan_select(select: &ast::Select, sources: &[SourceSchema<'_>]) -> Result<Planned, PlanError> {
    if let Some(d) = &select.distinct {
        return Err(unsupported(
            select,
            &format!("{d} (the key already makes rows unique)"),
        ));
    }
    if select.top.is_some() || select.into.is_some() || !select.lateral_views.is_empty() {
        return Err(unsupported(select, "TOP, INTO or LATERAL VIEW"));
    }
    if select.qualify.is_some() || !select.named_window.is_empty() {
        return Err(unsupported(select, "window functions (QUALIFY, WINDOW)"));
    }
    let [from] = select.from.as_slice() else {
        return Err(err_at(
            1,
            1,
            "FROM must name exactly one source (add others with JOIN ... ON)",
            Some("comma joins are not supported: write `a JOIN b ON a.x = b.y`".into()),
        ));
    };
    let mut rel = table_factor(&from.relation, sources)?;
    for join in &from.joins {
        rel = plan_join(rel, join, sources)?;
    }
    if let Some(selection) = &select.selection {
        let (predicate, ty) = ExprPlanner::row(&rel.scope).plan(selection)?;
        expect_bool(ty, selection, "WHERE")?;
        rel.plan = Plan::Filter {
            input: Box::new(rel.plan),
            predicate,
            sql: selection.to_string(),
        };
    }

    let group_exprs = match &select.group_by {
        ast::GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs.clone(),
        other => return Err(unsupported(select, &format!("GROUP BY form `{other}`"))),
    };
    let has_aggregates = select.projection.iter().any(|item| match item {
        ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. } => {
            contains_aggregate(e)
        }
        _ => false,
    }) || select.having.as_ref().is_some_and(contains_aggregate);

    if group_exprs.is_empty() && (has_aggregates || select.having.is_some()) {
        return Err(err_span(
            select,
            "aggregates need a GROUP BY: every table needs a key",
            Some("add GROUP BY with the columns that identify a row of the result".into()),
        ));
    }

    let mut select_exprs = Vec::new();
    let mut names = Vec::new();
    let (key, output_scope): (Vec<usize>, Vec<(String, ColumnType)>);
    if group_exprs.is_empty() {
        let planner = ExprPlanner::row(&rel.scope);
        for item in &select.projection {
            select_item(
                item,
                &rel.scope,
                &mut |e| planner.plan(e),
                &mut select_exprs,
                &mut names,
            )?;
        }
        key = rel.key.clone();
    } else {
        let mut groups = Vec::new();
        let mut group_types = Vec::new();
        for g in &group_exprs {
            let (e, ty) = ExprPlanner::row(&rel.scope).plan(g)?;
            groups.push(e);
            group_types.push(ty.unwrap_or(ColumnType::Text));
        }
        let group_text: Vec<String> = group_exprs.iter().map(|g| g.to_string()).collect();
        let mut grouped = ExprPlanner {
            scope: &rel.scope,
            grouped: Some(Grouped {
                group_text,
                group_types: group_types.clone(),
                aggregates: Vec::new(),
            }),
        };
        for item in &select.projection {
            if matches!(
                item,
                ast::SelectItem::Wildcard(_) | ast::SelectItem::QualifiedWildcard(..)
            ) {
                return Err(unsupported(
                    item,
                    "* with GROUP BY (name the group columns and aggregates)",
                ));
            }
            select_item(
                item,
                &rel.scope,
                &mut |e| grouped.plan_mut(e),
                &mut select_exprs,
                &mut names,
            )?;
        }
        let having = match &select.having {
            Some(h) => {
                let (e, ty) = grouped.plan_mut(h)?;
                expect_bool(ty, h, "HAVING")?;
                Some((e, h.to_string()))
            }
            None => None,
        };
        let aggregates = grouped.grouped.map(|g| g.aggregates).unwrap_or_default();
        let sql = format!(
            "GROUP BY {} computing {}",
            join_text(&group_exprs),
            aggregates
                .iter()
                .map(|(_, _, t)| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        rel.plan = Plan::Reduce {
            input: Box::new(rel.plan),
            group: groups,
            aggregates: aggregates.iter().map(|(a, _, _)| a.clone()).collect(),
            sql,
        };
        if let Some((predicate, sql)) = having {
            rel.plan = Plan::Filter {
                input: Box::new(rel.plan),
                predicate,
                sql,
            };
        }
        key = (0..group_exprs.len()).collect();
    }
    output_scope = select_exprs
        .iter()
        .map(|(_, ty)| *ty)
        .zip(names.iter())
        .map(|(t, n)| (n.clone(), t))
        .collect();

    // The key must survive the SELECT list: find each key column among the plain column outputs.
    let mut out_key = Vec::with_capacity(key.len());
    for k in &key {
        match select_exprs
            .iter()
            .position(|(e, _)| *e == Expr::Column(*k))
        {
            Some(pos) => out_key.push(pos),
            None => {
                let wanted = if group_exprs.is_empty() {
                    rel.scope[*k].name.clone()
                } else {
                    group_exprs[*k].to_string()
                };
                return Err(err_span(
                    select,
                    &format!("the result must include its key column `{wanted}`"),
                    Some(format!(
                        "every table needs a primary key: add `{wanted}` to the SELECT list (the key comes from the source key, the GROUP BY columns or the join inputs' keys)"
                    )),
                ));
            }
        }
    }
    let columns = output_scope
        .into_iter()
        .map(|(name, ty)| Column { name, ty })
        .collect();
    let plan = Plan::Map {
        input: Box::new(rel.plan),
        exprs: select_exprs.into_iter().map(|(e, _)| e).collect(),
        sql: join_text(&select.projection),
    };
    Ok(Planned {
        plan,
        columns,
        key: out_key,
    })
}

type Typed = (Expr, Option<ColumnType>);

fn select_item(
    item: &ast::SelectItem,
    scope: &[ScopeColumn],
    plan: &mut dyn FnMut(&ast::Expr) -> Result<Typed, PlanError>,
    exprs: &mut Vec<(Expr, ColumnType)>,
    names: &mut Vec<String>,
) -> Result<(), PlanError> {
    let mut push = |name: String, e: Expr, ty: Option<ColumnType>, at: &dyn ast::Spanned| {
        if names.contains(&name) {
            return Err(err_span(
                at,
                &format!("duplicate output column `{name}`"),
                Some("rename one with AS".into()),
            ));
        }
        names.push(name);
        exprs.push((e, ty.unwrap_or(ColumnType::Text)));
        Ok(())
    };
    match item {
        ast::SelectItem::UnnamedExpr(e) => {
            let name = match e {
                ast::Expr::Identifier(i) => ident(i),
                ast::Expr::CompoundIdentifier(parts) => {
                    ident(parts.last().expect("compound identifier has parts"))
                }
                ast::Expr::Function(f) => f.name.to_string().to_lowercase(),
                _ => {
                    return Err(err_span(
                        e,
                        "this expression needs a column name",
                        Some(format!("write `{e} AS name`")),
                    ));
                }
            };
            let (planned, ty) = plan(e)?;
            push(name, planned, ty, e)
        }
        ast::SelectItem::ExprWithAlias { expr, alias } => {
            let (planned, ty) = plan(expr)?;
            push(ident(alias), planned, ty, expr)
        }
        ast::SelectItem::ExprWithAliases { .. } => {
            Err(unsupported(item, "several aliases for one expression"))
        }
        ast::SelectItem::Wildcard(_) => {
            for (i, c) in scope.iter().enumerate() {
                push(c.name.clone(), Expr::Column(i), Some(c.ty), item)?;
            }
            Ok(())
        }
        ast::SelectItem::QualifiedWildcard(kind, _) => {
            let q = kind.to_string().trim_end_matches(".*").to_lowercase();
            let mut any = false;
            for (i, c) in scope.iter().enumerate().filter(|(_, c)| c.qualifier == q) {
                any = true;
                push(c.name.clone(), Expr::Column(i), Some(c.ty), item)?;
            }
            if !any {
                return Err(err_span(
                    item,
                    &format!("no relation named `{q}` in FROM"),
                    None,
                ));
            }
            Ok(())
        }
    }
}

fn table_factor(factor: &ast::TableFactor, sources: &[SourceSchema<'_>]) -> Result<Rel, PlanError> {
    let ast::TableFactor::Table {
        name,
        alias,
        args: None,
        ..
    } = factor
    else {
        return Err(unsupported(
            factor,
            "subqueries and table functions in FROM",
        ));
    };
    let wanted = name.to_string().to_lowercase();
    let Some((index, source)) = sources.iter().enumerate().find(|(_, s)| s.name == wanted) else {
        let known: Vec<&str> = sources.iter().map(|s| s.name).collect();
        return Err(err_span(
            factor,
            &format!("unknown source `{wanted}`"),
            Some(format!("declared sources: {}", known.join(", "))),
        ));
    };
    let qualifier = alias
        .as_ref()
        .map(|a| ident(&a.name))
        .unwrap_or_else(|| wanted.clone());
    Ok(Rel {
        plan: Plan::Source {
            source: index,
            name: wanted,
        },
        scope: source
            .columns
            .iter()
            .map(|c| ScopeColumn {
                qualifier: qualifier.clone(),
                name: c.name.clone(),
                ty: c.ty,
            })
            .collect(),
        key: source.key.to_vec(),
    })
}

fn plan_join(left: Rel, join: &ast::Join, sources: &[SourceSchema<'_>]) -> Result<Rel, PlanError> {
    let (kind, constraint) = match &join.join_operator {
        ast::JoinOperator::Join(c) | ast::JoinOperator::Inner(c) => (JoinKind::Inner, c),
        ast::JoinOperator::Left(c) | ast::JoinOperator::LeftOuter(c) => (JoinKind::Left, c),
        other => {
            let name = format!("{other:?}");
            let name = name.split('(').next().unwrap_or("this join");
            return Err(unsupported(
                &join.relation,
                &format!("{name} joins (use JOIN or LEFT JOIN)"),
            ));
        }
    };
    let ast::JoinConstraint::On(on) = constraint else {
        return Err(unsupported(
            &join.relation,
            "joins without ON (USING, NATURAL, CROSS)",
        ));
    };
    let right = table_factor(&join.relation, sources)?;
    let left_arity = left.scope.len();
    let mut left_keys = Vec::new();
    let mut right_keys = Vec::new();
    for eq in conjuncts(on) {
        let ast::Expr::BinaryOp {
            left: a,
            op: ast::BinaryOperator::Eq,
            right: b,
        } = eq
        else {
            return Err(err_span(
                eq,
                "only equalities joined by AND are supported in a join's ON",
                Some("move other conditions to WHERE".into()),
            ));
        };
        let side = |e: &ast::Expr| -> Result<(Option<Typed>, Option<Typed>), PlanError> {
            let l = ExprPlanner::row(&left.scope).plan(e).ok();
            let r = ExprPlanner::row(&right.scope).plan(e).ok();
            Ok((l, r))
        };
        let (a_left, a_right) = side(a)?;
        let (b_left, b_right) = side(b)?;
        let ((lk, lt), (rk, rt)) = match (a_left, b_right, b_left, a_right) {
            (Some(l), Some(r), _, _) => (l, r),
            (_, _, Some(l), Some(r)) => (l, r),
            _ => {
                return Err(err_span(
                    eq,
                    &format!(
                        "`{eq}` must compare a column of the left side with one of `{}`",
                        join.relation
                    ),
                    None,
                ))
            }
        };
        if !comparable(lt, rt) {
            return Err(type_error(eq, lt, rt));
        }
        left_keys.push(lk);
        right_keys.push(rk);
    }
    let key = join_key(
        (&left.key, &right.key),
        (&left_keys, &right_keys),
        kind,
        left_arity,
    );
    let right_arity = right.scope.len();
    let mut scope = left.scope;
    scope.extend(right.scope);
    Ok(Rel {
        plan: Plan::Join {
            left: Box::new(left.plan),
            right: Box::new(right.plan),
            left_keys,
            right_keys,
            kind,
            right_arity,
            sql: format!("{} ON {on}", join.relation),
        },
        scope,
        key,
    })
}

fn conjuncts(e: &ast::Expr) -> Vec<&ast::Expr> {
    match e {
        ast::Expr::BinaryOp {
            left,
            op: ast::BinaryOperator::And,
            right,
        } => {
            let mut out = conjuncts(left);
            out.extend(conjuncts(right));
            out
        }
        ast::Expr::Nested(inner) => conjuncts(inner),
        other => vec![other],
    }
}

fn aggregate_func(f: &ast::Function) -> Option<AggFunc> {
    match f.name.to_string().to_lowercase().as_str() {
        "count" => Some(AggFunc::Count),
        "sum" => Some(AggFunc::Sum),
        "min" => Some(AggFunc::Min),
        "max" => Some(AggFunc::Max),
        "avg" => Some(AggFunc::Avg),
        _ => None,
    }
}

fn contains_aggregate(e: &ast::Expr) -> bool {
    use ast::Expr as E;
    match e {
        E::Function(f) => aggregate_func(f).is_some(),
        E::BinaryOp { left, right, .. } => contains_aggregate(left) || contains_aggregate(right),
        E::UnaryOp { expr, .. }
        | E::Nested(expr)
        | E::IsNull(expr)
        | E::IsNotNull(expr)
        | E::Cast { expr, .. }
        | E::Trim { expr, .. } => contains_aggregate(expr),
        E::Case {
            operand,
            conditions,
            else_result,
            ..
        } => {
            operand.as_deref().is_some_and(contains_aggregate)
                || else_result.as_deref().is_some_and(contains_aggregate)
                || conditions
                    .iter()
                    .any(|w| contains_aggregate(&w.condition) || contains_aggregate(&w.result))
        }
        _ => false,
    }
}

struct Grouped {
    group_text: Vec<String>,
    group_types: Vec<ColumnType>,
    /// Aggregates found so far: the aggregate, its output type, and its SQL text (to share
    /// `count(*)` between the SELECT list and HAVING).
    aggregates: Vec<(Aggregate, ColumnType, String)>,
}

/// Plans expressions against a scope: either row by row, or over a GROUP BY's output.
struct ExprPlanner<'s> {
    scope: &'s [ScopeColumn],
    grouped: Option<Grouped>,
}

impl<'s> ExprPlanner<'s> {
    fn row(scope: &'s [ScopeColumn]) -> Self {
        ExprPlanner {
            scope,
            grouped: None,
        }
    }

    fn plan(&self, e: &ast::Expr) -> Result<Typed, PlanError> {
        let mut row = ExprPlanner {
            scope: self.scope,
            grouped: None,
        };
        row.plan_mut(e)
    }

    fn plan_mut(&mut self, e: &ast::Expr) -> Result<Typed, PlanError> {
        if let Some(g) = &self.grouped {
            let text = e.to_string();
            if let Some(i) = g.group_text.iter().position(|t| *t == text) {
                return Ok((Expr::Column(i), Some(g.group_types[i])));
            }
        }
        match e {
            ast::Expr::Identifier(_) | ast::Expr::CompoundIdentifier(_) => {
                let (i, ty) = self.resolve(e)?;
                if self.grouped.is_some() {
                    return Err(err_span(
                        e,
                        &format!("column `{e}` must appear in GROUP BY or be used in an aggregate"),
                        None,
                    ));
                }
                Ok((Expr::Column(i), Some(ty)))
            }
            ast::Expr::Value(v) => literal(&v.value, e),
            ast::Expr::Nested(inner) => self.plan_mut(inner),
            ast::Expr::IsNull(inner) => Ok((
                Expr::IsNull(Box::new(self.plan_mut(inner)?.0), false),
                Some(ColumnType::Boolean),
            )),
            ast::Expr::IsNotNull(inner) => Ok((
                Expr::IsNull(Box::new(self.plan_mut(inner)?.0), true),
                Some(ColumnType::Boolean),
            )),
            ast::Expr::UnaryOp { op, expr } => {
                let (inner, ty) = self.plan_mut(expr)?;
                match op {
                    ast::UnaryOperator::Not => {
                        expect_bool(ty, expr.as_ref(), "NOT")?;
                        Ok((Expr::Not(Box::new(inner)), Some(ColumnType::Boolean)))
                    }
                    ast::UnaryOperator::Minus if numeric(ty) => {
                        Ok((Expr::Neg(Box::new(inner)), ty))
                    }
                    ast::UnaryOperator::Plus if numeric(ty) => Ok((inner, ty)),
                    other => Err(unsupported(
                        e,
                        &format!("unary operator `{other}` on {}", type_name(ty)),
                    )),
                }
            }
            ast::Expr::BinaryOp { left, op, right } => self.binary(e, left, op, right),
            ast::Expr::Cast {
                kind: ast::CastKind::Cast | ast::CastKind::DoubleColon,
                expr,
                data_type,
                format: None,
                ..
            } => {
                let target = parse_type(data_type).ok_or_else(|| {
                    err_span(
                        e,
                        &format!("unsupported type `{data_type}` in CAST"),
                        Some(TYPES_HINT.into()),
                    )
                })?;
                let (inner, _) = self.plan_mut(expr)?;
                Ok((Expr::Cast(Box::new(inner), target), Some(target)))
            }
            ast::Expr::Trim {
                expr,
                trim_where: None,
                trim_what: None,
                trim_characters: None,
            } => {
                let (inner, ty) = self.plan_mut(expr)?;
                expect_type(ty, ColumnType::Text, expr.as_ref(), "trim")?;
                Ok((Expr::Call(Func::Trim, vec![inner]), Some(ColumnType::Text)))
            }
            ast::Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                let mut branches = Vec::new();
                let mut result_ty: Option<ColumnType> = None;
                let operand = operand.as_ref().map(|o| self.plan_mut(o)).transpose()?;
                for when in conditions {
                    let (cond, cty) = self.plan_mut(&when.condition)?;
                    let cond = match &operand {
                        Some((o, oty)) => {
                            if !comparable(*oty, cty) {
                                return Err(type_error(&when.condition, *oty, cty));
                            }
                            Expr::Binary(BinaryOp::Eq, Box::new(o.clone()), Box::new(cond))
                        }
                        None => {
                            expect_bool(cty, &when.condition, "CASE WHEN")?;
                            cond
                        }
                    };
                    let (value, vty) = self.plan_mut(&when.result)?;
                    result_ty = unify(result_ty, vty)
                        .ok_or_else(|| type_error(&when.result, result_ty, vty))?;
                    branches.push((cond, value));
                }
                let otherwise = match else_result {
                    Some(el) => {
                        let (value, vty) = self.plan_mut(el)?;
                        result_ty = unify(result_ty, vty)
                            .ok_or_else(|| type_error(el.as_ref(), result_ty, vty))?;
                        Some(Box::new(value))
                    }
                    None => None,
                };
                Ok((Expr::Case(branches, otherwise), result_ty))
            }
            ast::Expr::Function(f) => self.function(e, f),
            ast::Expr::Like {
                negated,
                any: false,
                expr,
                pattern,
                escape_char: None,
            }
            | ast::Expr::ILike {
                negated,
                any: false,
                expr,
                pattern,
                escape_char: None,
            } => {
                let (text, ty) = self.plan_mut(expr)?;
                expect_type(ty, ColumnType::Text, expr.as_ref(), "LIKE")?;
                let (pat, pty) = self.plan_mut(pattern)?;
                expect_type(pty, ColumnType::Text, pattern.as_ref(), "LIKE")?;
                Ok((
                    Expr::Like {
                        expr: Box::new(text),
                        pattern: Box::new(pat),
                        negated: *negated,
                        case_insensitive: matches!(e, ast::Expr::ILike { .. }),
                    },
                    Some(ColumnType::Boolean),
                ))
            }
            other => Err(unsupported(other, &construct_name(other))),
        }
    }

    fn resolve(&self, e: &ast::Expr) -> Result<(usize, ColumnType), PlanError> {
        let (qualifier, name) = match e {
            ast::Expr::Identifier(i) => (None, ident(i)),
            ast::Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                (Some(ident(&parts[0])), ident(&parts[1]))
            }
            _ => return Err(unsupported(e, "identifiers with more than two parts")),
        };
        let matches: Vec<usize> = self
            .scope
            .iter()
            .enumerate()
            // The principal's columns are reached qualified only: `id` is the row's.
            .filter(|(_, c)| match &qualifier {
                Some(q) => c.name == name && *q == c.qualifier,
                None => c.name == name && c.qualifier != "principal",
            })
            .map(|(i, _)| i)
            .collect();
        match matches.as_slice() {
            [i] => Ok((*i, self.scope[*i].ty)),
            [] => {
                let known: Vec<String> = self
                    .scope
                    .iter()
                    .map(|c| format!("{}.{}", c.qualifier, c.name))
                    .collect();
                Err(err_span(
                    e,
                    &format!("unknown column `{e}`"),
                    Some(format!("columns in scope: {}", known.join(", "))),
                ))
            }
            _ => Err(err_span(
                e,
                &format!("column `{e}` is ambiguous"),
                Some("qualify it with its source or alias".into()),
            )),
        }
    }

    fn binary(
        &mut self,
        e: &ast::Expr,
        l: &ast::Expr,
        op: &ast::BinaryOperator,
        r: &ast::Expr,
    ) -> Result<Typed, PlanError> {
        use ast::BinaryOperator as B;
        let (le, lt) = self.plan_mut(l)?;
        let (re, rt) = self.plan_mut(r)?;
        let bin = |op| Expr::Binary(op, Box::new(le.clone()), Box::new(re.clone()));
        match op {
            B::And | B::Or => {
                expect_bool(lt, l, &op.to_string())?;
                expect_bool(rt, r, &op.to_string())?;
                Ok((
                    bin(if *op == B::And {
                        BinaryOp::And
                    } else {
                        BinaryOp::Or
                    }),
                    Some(ColumnType::Boolean),
                ))
            }
            B::Eq | B::NotEq | B::Lt | B::LtEq | B::Gt | B::GtEq => {
                if !comparable(lt, rt) {
                    return Err(type_error(e, lt, rt));
                }
                let op = match op {
                    B::Eq => BinaryOp::Eq,
                    B::NotEq => BinaryOp::NotEq,
                    B::Lt => BinaryOp::Lt,
                    B::LtEq => BinaryOp::LtEq,
                    B::Gt => BinaryOp::Gt,
                    _ => BinaryOp::GtEq,
                };
                Ok((bin(op), Some(ColumnType::Boolean)))
            }
            B::Plus | B::Minus | B::Multiply | B::Divide | B::Modulo => {
                if !(numeric(lt) && numeric(rt)) {
                    return Err(err_span(
                        e,
                        &format!(
                            "`{op}` needs numbers, found {} and {}",
                            type_name(lt),
                            type_name(rt)
                        ),
                        Some("use || or concat() for text".into()),
                    ));
                }
                let ty = if lt == Some(ColumnType::Double) || rt == Some(ColumnType::Double) {
                    Some(ColumnType::Double)
                } else {
                    lt.or(rt)
                };
                let op = match op {
                    B::Plus => BinaryOp::Add,
                    B::Minus => BinaryOp::Sub,
                    B::Multiply => BinaryOp::Mul,
                    B::Divide => BinaryOp::Div,
                    _ => BinaryOp::Mod,
                };
                Ok((bin(op), ty))
            }
            B::StringConcat => Ok((bin(BinaryOp::Concat), Some(ColumnType::Text))),
            other => Err(unsupported(e, &format!("operator `{other}`"))),
        }
    }

    fn function(&mut self, e: &ast::Expr, f: &ast::Function) -> Result<Typed, PlanError> {
        let name = f.name.to_string().to_lowercase();
        if f.over.is_some() || f.filter.is_some() || !f.within_group.is_empty() {
            return Err(unsupported(e, "window functions, FILTER and WITHIN GROUP"));
        }
        let ast::FunctionArguments::List(list) = &f.args else {
            return Err(unsupported(
                e,
                &format!("`{name}` without an argument list"),
            ));
        };
        if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
            return Err(unsupported(
                e,
                "DISTINCT, ORDER BY or other clauses inside a function call",
            ));
        }
        let mut star = false;
        let mut args = Vec::new();
        for a in &list.args {
            match a {
                ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(x)) => args.push(x),
                ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Wildcard) => star = true,
                _ => {
                    return Err(unsupported(
                        e,
                        "named or qualified-wildcard function arguments",
                    ))
                }
            }
        }
        if let Some(func) = aggregate_func(f) {
            return self.aggregate(e, func, star, &args);
        }
        if star {
            return Err(err_span(e, &format!("`{name}(*)` is not a function"), None));
        }
        let mut planned = Vec::new();
        for a in &args {
            planned.push(self.plan_mut(a)?);
        }
        let one_text = |func: Func, out: ColumnType, planned: Vec<Typed>| {
            let [(arg, ty)] = <[Typed; 1]>::try_from(planned)
                .map_err(|_| err_span(e, &format!("`{name}` takes one argument"), None))?;
            expect_type(ty, ColumnType::Text, e, &name)?;
            Ok((Expr::Call(func, vec![arg]), Some(out)))
        };
        match name.as_str() {
            "lower" => one_text(Func::Lower, ColumnType::Text, planned),
            "upper" => one_text(Func::Upper, ColumnType::Text, planned),
            "trim" => one_text(Func::Trim, ColumnType::Text, planned),
            "length" | "char_length" => one_text(Func::Length, ColumnType::Bigint, planned),
            "has_role" => {
                let roles = self
                    .scope
                    .iter()
                    .position(|c| c.qualifier == "principal" && c.name == "roles")
                    .ok_or_else(|| {
                        err_span(
                            e,
                            "`has_role` is only available in command rules and row filters",
                            None,
                        )
                    })?;
                let [(role, ty)] = <[Typed; 1]>::try_from(planned)
                    .map_err(|_| err_span(e, "`has_role` takes one argument: the role", None))?;
                expect_type(ty, ColumnType::Text, e, "has_role")?;
                Ok((
                    Expr::Call(Func::HasRole, vec![Expr::Column(roles), role]),
                    Some(ColumnType::Boolean),
                ))
            }
            "concat" => Ok((Expr::Call(Func::Concat, planned.into_iter().map(|(a, _)| a).collect()), Some(ColumnType::Text))),
            "coalesce" => {
                if planned.is_empty() {
                    return Err(err_span(e, "coalesce needs at least one argument", None));
                }
                let mut ty = None;
                for (i, (_, t)) in planned.iter().enumerate() {
                    ty = unify(ty, *t).ok_or_else(|| type_error(args[i], ty, *t))?;
                }
                Ok((Expr::Call(Func::Coalesce, planned.into_iter().map(|(a, _)| a).collect()), ty))
            }
            _ => Err(err_span(
                e,
                &format!("unknown function `{name}`"),
                Some("supported: lower, upper, trim, length, concat, coalesce, count, sum, min, max, avg, CAST".into()),
            )),
        }
    }

    fn aggregate(
        &mut self,
        e: &ast::Expr,
        func: AggFunc,
        star: bool,
        args: &[&ast::Expr],
    ) -> Result<Typed, PlanError> {
        if self.grouped.is_none() {
            return Err(err_span(
                e,
                "aggregates are not allowed here",
                Some("aggregates go in the SELECT list or HAVING of a GROUP BY query".into()),
            ));
        }
        let (func, arg, ty) = match (func, star, args) {
            (AggFunc::Count, true, []) => (
                AggFunc::CountStar,
                Expr::Literal(Value::Null),
                ColumnType::Bigint,
            ),
            (_, false, [a]) => {
                let (arg, ty) = ExprPlanner::row(self.scope).plan(a)?;
                let out = match func {
                    AggFunc::Count => ColumnType::Bigint,
                    AggFunc::Avg => {
                        if !numeric(ty) {
                            return Err(err_span(
                                e,
                                &format!("avg needs numbers, found {}", type_name(ty)),
                                None,
                            ));
                        }
                        ColumnType::Double
                    }
                    AggFunc::Sum => {
                        if !numeric(ty) {
                            return Err(err_span(
                                e,
                                &format!("sum needs numbers, found {}", type_name(ty)),
                                None,
                            ));
                        }
                        ty.unwrap_or(ColumnType::Bigint)
                    }
                    _ => ty.unwrap_or(ColumnType::Text),
                };
                (func, arg, out)
            }
            _ => {
                return Err(err_span(
                    e,
                    "aggregates take exactly one argument (or * for count)",
                    None,
                ))
            }
        };
        let grouped = self.grouped.as_mut().expect("checked above");
        let text = e.to_string();
        let index = match grouped.aggregates.iter().position(|(_, _, t)| *t == text) {
            Some(i) => i,
            None => {
                grouped.aggregates.push((Aggregate { func, arg }, ty, text));
                grouped.aggregates.len() - 1
            }
        };
        Ok((Expr::Column(grouped.group_text.len() + index), Some(ty)))
    }
}

fn join_text<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

const TYPES_HINT: &str = "types: text, bigint, double precision, boolean, timestamptz";

fn parse_type(dt: &ast::DataType) -> Option<ColumnType> {
    let text = dt.to_string();
    ColumnType::parse(text.split('(').next().unwrap_or(&text))
}

fn literal(v: &ast::Value, at: &ast::Expr) -> Result<Typed, PlanError> {
    Ok(match v {
        ast::Value::Number(n, _) => match n.parse::<i64>() {
            Ok(i) => (Expr::Literal(Value::Int(i)), Some(ColumnType::Bigint)),
            Err(_) => match n.parse::<f64>() {
                Ok(f) => (
                    Expr::Literal(Value::Float(F64(f))),
                    Some(ColumnType::Double),
                ),
                Err(_) => return Err(err_span(at, &format!("bad number `{n}`"), None)),
            },
        },
        ast::Value::SingleQuotedString(s) => (
            Expr::Literal(Value::Text(s.as_str().into())),
            Some(ColumnType::Text),
        ),
        ast::Value::Boolean(b) => (Expr::Literal(Value::Bool(*b)), Some(ColumnType::Boolean)),
        ast::Value::Null => (Expr::Literal(Value::Null), None),
        other => return Err(unsupported(at, &format!("literal `{other}`"))),
    })
}

fn ident(i: &ast::Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

fn numeric(t: Option<ColumnType>) -> bool {
    matches!(
        t,
        None | Some(ColumnType::Bigint) | Some(ColumnType::Double)
    )
}

fn comparable(a: Option<ColumnType>, b: Option<ColumnType>) -> bool {
    match (a, b) {
        (None, _) | (_, None) => true,
        (Some(a), Some(b)) => a == b || (numeric(Some(a)) && numeric(Some(b))),
    }
}

/// The common type of two branches (NULL fits anything; bigint widens to double).
fn unify(a: Option<ColumnType>, b: Option<ColumnType>) -> Option<Option<ColumnType>> {
    match (a, b) {
        (None, t) | (t, None) => Some(t),
        (Some(x), Some(y)) if x == y => Some(Some(x)),
        (Some(x), Some(y)) if numeric(Some(x)) && numeric(Some(y)) => {
            Some(Some(ColumnType::Double))
        }
        _ => None,
    }
}

fn type_name(t: Option<ColumnType>) -> &'static str {
    t.map(ColumnType::name).unwrap_or("NULL")
}

fn expect_bool(ty: Option<ColumnType>, at: &dyn ast::Spanned, what: &str) -> Result<(), PlanError> {
    expect_type(ty, ColumnType::Boolean, at, what)
}

fn expect_type(
    ty: Option<ColumnType>,
    want: ColumnType,
    at: &dyn ast::Spanned,
    what: &str,
) -> Result<(), PlanError> {
    match ty {
        None => Ok(()),
        Some(t) if t == want => Ok(()),
        Some(t) => Err(err_span(
            at,
            &format!("{what} needs {want}, found {t}"),
            None,
        )),
    }
}

fn type_error(at: &dyn ast::Spanned, a: Option<ColumnType>, b: Option<ColumnType>) -> PlanError {
    err_span(
        at,
        &format!("type mismatch: {} and {}", type_name(a), type_name(b)),
        Some("convert one side with CAST(x AS type)".into()),
    )
}

fn construct_name(e: &ast::Expr) -> String {
    let debug = format!("{e:?}");
    let variant = debug.split(['(', ' ', '{']).next().unwrap_or("expression");
    match e {
        ast::Expr::Subquery(_) | ast::Expr::Exists { .. } => "subqueries".into(),
        ast::Expr::Like { .. } | ast::Expr::ILike { .. } => "LIKE ANY or ESCAPE".into(),
        ast::Expr::In { .. } => "IN (use = ... OR = ...)".into(),
        ast::Expr::Between { .. } => "BETWEEN (use >= AND <=)".into(),
        _ => format!("expression `{e}` ({variant})"),
    }
}

fn unsupported(at: &dyn ast::Spanned, what: &str) -> PlanError {
    err_span(at, &format!("unsupported: {what}"), None)
}

fn err_span(at: &dyn ast::Spanned, message: &str, hint: Option<String>) -> PlanError {
    let start = at.span().start;
    err_at(start.line as usize, start.column as usize, message, hint)
}

fn err_at(line: usize, col: usize, message: &str, hint: Option<String>) -> PlanError {
    PlanError {
        line,
        col,
        message: message.to_string(),
        hint,
    }
}

fn parse_error(e: sqlparser::parser::ParserError) -> PlanError {
    let text = e.to_string();
    // sqlparser ends its messages with "at Line: L, Column: C".
    let (message, line, col) = match text.rsplit_once(" at Line: ") {
        Some((msg, pos)) => {
            let mut parts = pos.split(", Column: ");
            let line = parts
                .next()
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or(0);
            let col = parts
                .next()
                .and_then(|c| c.trim().parse().ok())
                .unwrap_or(0);
            (msg.to_string(), line, col)
        }
        None => (text, 0, 0),
    };
    PlanError {
        line,
        col,
        message: format!(
            "SQL syntax error: {}",
            message.trim_start_matches("sql parser error: ")
        ),
        hint: None,
    }
}
